"""Times the kernel benchmark of this tree beside another tree of seqmix, in one run.

    python -m seqmix.experiments.device.compare_revisions --other=/path/to/old/tree \
        --ops=attention,linear_attention,decode_attention,scan_op,conv_op

For each op it runs ``bench_kernels --quick`` (for the names in ``DIRECT``, such as
``scan_op`` or ``attention_op``: time_ops.py, which times the public op at fixed shapes)
three times, in separate processes: this tree, the other tree, this tree again (A B A), each
with its own tree first on ``PYTHONPATH``. Rows
are matched by (label, impl); every time column (``*ms``, ``*us``) is compared. The two runs
of this tree give the run-to-run noise of each row; a row counts as slower only when the
other tree beats both runs of this tree by more than that noise and by more than
``--min_noise``. Writes ``compare_revisions.json`` under ``$OUT`` (or ``--out_dir``) and
prints a table last.
"""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time

from absl import app, flags

HERE = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def _define_flags():
    """The launcher's flags, defined only when it runs (importing ``compare`` defines none,
    so tests can import it beside other launchers with the same flag names)."""
    global _OTHER, _OPS, _MIN_NOISE, _LIMIT, _DEADLINE, _OUT_DIR
    _OTHER = flags.DEFINE_string("other", None, "Root of the other seqmix tree (the baseline).")
    _OPS = flags.DEFINE_list(
        "ops",
        ["attention", "linear_attention", "decode_attention", "scan_op", "conv_op"],
        "Ops of bench_kernels to compare.",
    )
    _MIN_NOISE = flags.DEFINE_float(
        "min_noise", 0.03, "Relative differences below this are noise whatever the repeat says."
    )
    _LIMIT = flags.DEFINE_integer("limit_s", 200, "Time limit of each benchmark process.")
    _DEADLINE = flags.DEFINE_integer("deadline_s", 0, "Start no new process after this (0: none).")
    _OUT_DIR = flags.DEFINE_string("out_dir", None, "Where results go (default $OUT or runs/).")


# Ops timed by time_ops.py (the public op at fixed shapes, the same in both trees) instead of
# bench_kernels --quick, whose shapes a tree may have changed.
DIRECT = {
    "scan_op": "selective_scan",
    "conv_op": "causal_conv1d",
    "attention_op": "attention",
    "linear_attention_op": "linear_attention",
    "delta_rule_op": "gated_delta_rule",
    "decode_op": "decode_attention",
}

# What names a row (the measured columns aside): present in some benchmarks, not in others.
KEY_FIELDS = ("label", "series", "decay", "impl", "B", "T", "H", "Hkv", "D", "Dm", "N", "C", "W")


def row_key(row: dict) -> tuple:
    return tuple((k, str(row[k])) for k in KEY_FIELDS if k in row)


def time_keys(row: dict) -> list[str]:
    return [
        k
        for k, v in row.items()
        if isinstance(v, (int, float)) and (k == "ms" or k.endswith(("_ms", "_us")) or k == "us")
    ]


def bench(tree: str, op: str, out_dir: str) -> dict[tuple, dict]:
    """Rows of one ``bench_kernels --quick`` process of ``tree``, keyed by (label, impl)."""
    os.makedirs(out_dir, exist_ok=True)
    env = dict(os.environ)
    env.pop("OUT", None)  # results go to out_dir only
    extra = [p for p in env.get("PYTHONPATH", "").split(":") if p and os.path.abspath(p) != HERE]
    env["PYTHONPATH"] = ":".join([tree, *extra])
    if op in DIRECT:
        script = os.path.join(HERE, "seqmix", "experiments", "device", "time_ops.py")
        cmd = [sys.executable, script, f"--op={DIRECT[op]}"]
        cmd.append(f"--out={os.path.join(out_dir, op + '_direct.json')}")
    else:
        cmd = [sys.executable, "-m", "seqmix.experiments.bench_kernels", f"--op={op}", "--quick"]
        cmd.append(f"--out_dir={out_dir}")
    start = time.time()
    with open(os.path.join(out_dir, "log.txt"), "w") as log:
        proc = subprocess.Popen(cmd, cwd=tree, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            proc.wait(timeout=_LIMIT.value)
        except subprocess.TimeoutExpired:
            # SIGINT first: bench_kernels then writes the rows it has measured
            print(f"  {op} in {tree}: past {_LIMIT.value}s", flush=True)
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    print(f"  {op} in {tree}: {time.time() - start:.0f}s", flush=True)
    rows = {}
    for path in glob.glob(os.path.join(out_dir, f"{op}_*.json")):
        with open(path) as f:
            for r in json.load(f).get("rows", []):
                rows[row_key(r)] = r
    return rows


def compare(new_a: dict, old: dict, new_b: dict, min_noise: float) -> list[dict]:
    """One result per (row, time column) present in all three runs."""
    out = []
    for key in new_a:
        if key not in old or key not in new_b:
            continue
        for col in time_keys(new_a[key]):
            a, b, o = new_a[key].get(col), new_b[key].get(col), old[key].get(col)
            if not all(isinstance(x, (int, float)) and x > 0 for x in (a, b, o)):
                continue
            noise = max(abs(a - b) / min(a, b), min_noise)
            best = min(a, b)
            named = dict(key)
            label = named.get("label") or " ".join(
                f"{k}={v}" for k, v in key if k not in ("impl", "label")
            )
            out.append(
                {
                    "label": label,
                    "impl": named.get("impl", ""),
                    "column": col,
                    "new": best,
                    "old": o,
                    "new_over_old": best / o,
                    "noise": noise,
                    "slower": best > o * (1 + noise),
                }
            )
    return out


def main(argv):
    del argv
    if not _OTHER.value or not os.path.isdir(os.path.join(_OTHER.value, "seqmix")):
        raise app.UsageError(f"--other must be the root of a seqmix tree, got {_OTHER.value!r}")
    out_dir = _OUT_DIR.value or os.environ.get("OUT") or os.path.join(HERE, "runs")
    start = time.time()
    results = []
    for op in _OPS.value:
        if _DEADLINE.value and time.time() - start > _DEADLINE.value:
            print(f"deadline: {op} and later ops not run", flush=True)
            break
        base = os.path.join(out_dir, "compare", op)
        new_a = bench(HERE, op, os.path.join(base, "new_a"))
        old = bench(os.path.abspath(_OTHER.value), op, os.path.join(base, "old"))
        new_b = bench(HERE, op, os.path.join(base, "new_b"))
        rows = compare(new_a, old, new_b, _MIN_NOISE.value)
        for r in rows:
            r["op"] = op
        results += rows
        print(f"{op}: {len(rows)} comparisons, {sum(r['slower'] for r in rows)} slower", flush=True)
    with open(os.path.join(out_dir, "compare_revisions.json"), "w") as f:
        json.dump({"other": _OTHER.value, "rows": results}, f, indent=1)
    print("| op | label | impl | column | new | old | new/old | noise | slower |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['op']} | {r['label']} | {r['impl']} | {r['column']} | {r['new']:.4g} | "
            f"{r['old']:.4g} | {r['new_over_old']:.3f} | {r['noise']:.3f} | "
            f"{'SLOWER' if r['slower'] else ''} |"
        )


if __name__ == "__main__":
    _define_flags()
    app.run(main)
