#!/usr/bin/env bash
# One device session: install the carried wheels, then run the named stages in order,
# each stage's log under $OUT. Usage: experiments/device/run.sh check bench:attention ...
# Stages: check[:op,op] | bench:<op> | bench_quick:<op> | tune:<D> | final[:sections]
#         | model[:flags] | recall[:flags] | recall_probe[:flags]
#         (flags separated by spaces, the stage quoted)
# A stage may be given a time limit in seconds after '@': bench:attention@240.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
else
  export PYTHONPATH=$PWD
fi
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm --format=csv,noheader
for stage in "$@"; do
  limit=600; case $stage in *@*) limit=${stage##*@}; stage=${stage%@*} ;; esac
  name=${stage%%:*}; arg=${stage#*:}; [ "$arg" = "$stage" ] && arg=""
  # INT first (scripts write what they have), KILL 45 s later if that did not end it
  T="timeout -k 45 -s INT $limit"
  tag=${arg//[^A-Za-z0-9_.]/_}
  log="$OUT/${name}_${tag:0:60}.log"
  echo "=== $stage" | tee -a "$OUT/summary.txt"
  start=$(date +%s)
  case $name in
    check) $T python3 -m seqmix.experiments.gpu_check ${arg:+--only=$arg} > "$log" 2>&1 ;;
    bench) $T python3 -m seqmix.experiments.bench_kernels --op="$arg" --out_dir="$OUT" > "$log" 2>&1 ;;
    bench_quick) $T python3 -m seqmix.experiments.bench_kernels --op="$arg" --quick --out_dir="$OUT" > "$log" 2>&1 ;;
    model) $T python3 -m seqmix.experiments.bench_model ${arg:+$arg} --out_dir="$OUT" > "$log" 2>&1 ;;
    recall_probe) $T python3 -m seqmix.experiments.device.recall_probe ${arg:+$arg} > "$log" 2>&1 ;;
    recall) $T python3 -m seqmix.experiments.recall_sweep ${arg:+$arg} --out_dir="$OUT" > "$log" 2>&1 ;;
    final) $T python3 -m seqmix.experiments.device.final --sections="${arg:-targets}" \
             --deadline_s=$((limit - 100)) > "$log" 2>&1 ;;
    # tune:<args of tune_blocks>: the winners go to $OUT/tuning.json, which every later stage
    # of this call applies through SEQMIX_ATTENTION_TUNING (the table itself is unchanged)
    tune) $T python3 -c "from seqmix.experiments.bench.attention import tune_blocks
tune_blocks($arg, out='$OUT/tuning.json')" > "$log" 2>&1
          [ -f "$OUT/tuning.json" ] && export SEQMIX_ATTENTION_TUNING=$OUT/tuning.json ;;
    *) echo "unknown stage $stage"; continue ;;
  esac
  rc=$?
  echo "rc=$rc in $(( $(date +%s) - start ))s" | tee -a "$OUT/summary.txt"
  # the table printed last by each stage
  awk '/^\| |^best /' "$log" | tail -60 | tee -a "$OUT/summary.txt"
  [ $rc -ne 0 ] && tail -30 "$log" | tee -a "$OUT/summary.txt"
done
# At most 8 files come back from $OUT: bundle everything but the summary.
cd "$OUT" && tar czf bundle.tgz --exclude=bundle.tgz --exclude=summary.txt . && \
  find . -mindepth 1 ! -name bundle.tgz ! -name summary.txt -delete
ls -la "$OUT"
