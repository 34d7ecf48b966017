#!/usr/bin/env bash
# Creates .venv in the checkout with a Python >= 3.12 and installs seqmix into it with the
# pinned versions of constraints.txt. Usage: scripts/setup.sh [EXTRAS] (default: test,notebooks).
#
# The interpreter: $SEQMIX_PYTHON if set; otherwise a Python 3.12 (the version CI and the GPU
# machine use), else the newest >= 3.12, looked for among python3.12, python3.13, python3 on
# PATH (pyenv shims that refuse to run are skipped), the versions pyenv selects
# ($PYENV_VERSION, .python-version) and pyenv's installed versions.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  -h|--help) sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
  -*) echo "scripts/setup.sh: unknown option $1 (usage: scripts/setup.sh [EXTRAS])" >&2; exit 2 ;;
esac
extras="${1:-test,notebooks}"

ok() {  # ok PYTHON [exact]: PYTHON runs, has venv, and is >= 3.12 (== 3.12 with "exact")
  "$1" -c 'import sys, venv; v = sys.version_info[:2]
sys.exit(not (v == (3, 12) if sys.argv[1:] else v >= (3, 12)))' ${2:+exact} >/dev/null 2>&1
}

candidates=()
[ -n "${SEQMIX_PYTHON:-}" ] && candidates+=("$SEQMIX_PYTHON")
for name in python3.12 python3.13 python3; do
  path="$(command -v "$name" 2>/dev/null || true)"
  [ -n "$path" ] && candidates+=("$path")
done
root="$(pyenv root 2>/dev/null || echo "${PYENV_ROOT:-$HOME/.pyenv}")"
if [ -d "$root/versions" ]; then
  if [ -n "${PYENV_VERSION:-}" ]; then
    IFS=: read -ra selected <<<"$PYENV_VERSION"
    for v in "${selected[@]}"; do candidates+=("$root/versions/$v/bin/python3"); done
  fi
  if [ -f .python-version ]; then
    while read -r v; do [ -n "$v" ] && candidates+=("$root/versions/$v/bin/python3"); done <.python-version
  fi
  while read -r v; do
    candidates+=("$root/versions/$v/bin/python3")
  done < <(ls "$root/versions" 2>/dev/null | grep -E '^3\.[0-9]+' | sort -t. -k1,1nr -k2,2nr -k3,3nr)
fi

python=""
if [ -n "${SEQMIX_PYTHON:-}" ]; then
  ok "$SEQMIX_PYTHON" && python="$SEQMIX_PYTHON"
else
  for exact in 1 ""; do
    for c in "${candidates[@]}"; do
      if [ -x "$c" ] && ok "$c" $exact; then python="$c"; break 2; fi
    done
  done
fi

if [ -z "$python" ]; then
  found="$( (for c in python3 python; do command -v "$c" >/dev/null 2>&1 && "$c" --version 2>&1; done; true) | sort -u | tr "\n" " ")"
  cat >&2 <<MSG
seqmix needs Python 3.12 or newer (JAX 0.11 requires it); none was found here (found: ${found:-no python}).
Install one and run this again: with pyenv, 'pyenv install 3.12' (it is found without
'pyenv global'); with apt, 'sudo apt install python3.12 python3.12-venv'; with uv,
'uv python install 3.12'; or from python.org. To use a particular interpreter, set
SEQMIX_PYTHON=/path/to/python3.12.
MSG
  exit 1
fi

if [ -x .venv/bin/python ] && ! ok .venv/bin/python; then
  echo "scripts/setup.sh: .venv has Python < 3.12; recreating it" >&2
  rm -rf .venv
fi
if [ ! -x .venv/bin/python ]; then
  echo "scripts/setup.sh: creating .venv with $python ($("$python" --version 2>&1))"
  "$python" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c constraints.txt -e ".[$extras]"
echo "scripts/setup.sh: seqmix installed in .venv ($(.venv/bin/python --version 2>&1)); activate it with '. .venv/bin/activate'"
