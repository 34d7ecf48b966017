"""Times every implementation of one op side by side, with the ceilings of the same run.

    python -m seqmix.experiments.bench_kernels --op=attention   # or linear_attention, selective_scan,
        # causal_conv1d, decode_attention, linear_attention_step, causal_conv1d_step
Writes JSON to benchmarks/results/ (and $OUT), prints a markdown table last.
"""

from __future__ import annotations

import importlib
import signal

from absl import app, flags

from seqmix.experiments.bench import common

OPS = {
    "attention": "seqmix.experiments.bench.attention",
    "decode_attention": "seqmix.experiments.bench.attention",
    "linear_attention": "seqmix.experiments.bench.linear_attention",
    "gated_delta_rule": "seqmix.experiments.bench.delta_rule",
    "selective_scan": "seqmix.experiments.bench.selective_scan",
    "causal_conv1d": "seqmix.experiments.bench.selective_scan",
    "linear_attention_step": "seqmix.experiments.bench.steps",
    "causal_conv1d_step": "seqmix.experiments.bench.steps",
}

_OP = flags.DEFINE_enum("op", "attention", list(OPS), "Which op to benchmark.")
_QUICK = flags.DEFINE_bool("quick", False, "Fewer shapes (a smoke run).")
_OUT = flags.DEFINE_string("out_dir", None, "Results folder (default benchmarks/results).")


def main(argv):
    del argv
    # SIGINT (the device stage's time limit) must raise KeyboardInterrupt even when this
    # process started with it ignored (children of pytest-xdist workers, background jobs)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    module = importlib.import_module(OPS[_OP.value])
    ceilings = {"bf16_matmul_tflops": common.matmul_ceiling(), "copy_tbps": common.copy_ceiling()}
    print("ceilings:", ceilings, flush=True)
    rows, columns, path = common.run_op(module, _OP.value, _QUICK.value, ceilings, _OUT.value)
    print(f"wrote {path}")
    print(common.markdown_table(rows, columns))


if __name__ == "__main__":
    app.run(main)
