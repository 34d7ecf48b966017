"""Times every implementation of one op side by side, with the ceilings of the same run; or
autotunes the op's Pallas Configs (the Mosaic GPU engine's for linear_attention_mgpu).

    python -m seqmix.experiments.bench_kernels --op=attention   # or any op of OPS
    python -m seqmix.experiments.bench_kernels --op=attention --tune --tuning_out=tuning.json

One benchmark module per op (``seqmix.experiments.bench.<op>``), each calling only the
public op. Timing writes JSON to benchmarks/results/ (and $OUT), prints a markdown table
last. ``--tune`` runs ``seqmix.kernels.tune.autotune`` at the module's tuning shapes and
merges the winners into ``--tuning_out``; ``SEQMIX_TUNING=<that file>`` applies them to every
later call.
"""

from __future__ import annotations

import importlib
import signal

from absl import app, flags

from seqmix.experiments.bench import common

OPS = (
    "attention",
    "decode_attention",
    "linear_attention",
    "linear_attention_mgpu",
    "linear_attention_step",
    "gated_delta_rule",
    "selective_scan",
    "causal_conv1d",
    "causal_conv1d_step",
)

_OP = flags.DEFINE_enum("op", "attention", list(OPS), "Which op to benchmark.")
_QUICK = flags.DEFINE_bool("quick", False, "Fewer shapes (a smoke run).")
_OUT = flags.DEFINE_string("out_dir", None, "Results folder (default benchmarks/results).")
_TUNE = flags.DEFINE_bool("tune", False, "Autotune the op's Pallas Configs instead of timing.")
_TUNING_OUT = flags.DEFINE_string(
    "tuning_out", None, "Tuning file the autotuner's winners are merged into (with --tune)."
)


def module(op: str):
    """The benchmark module of ``op``."""
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    return importlib.import_module(f"seqmix.experiments.bench.{op}")


def main(argv):
    del argv
    # SIGINT (a time limit of the caller) must raise KeyboardInterrupt even when this
    # process started with it ignored (children of pytest-xdist workers, background jobs)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    mod = module(_OP.value)
    if _TUNE.value:
        for result in mod.tune(_QUICK.value, _TUNING_OUT.value):
            print(
                f"| {result.op} | {result.implementation} | {result.key} | "
                f"{common.config_label(result.best)} | {result.seconds} |"
            )
        return
    ceilings = {"bf16_matmul_tflops": common.matmul_ceiling(), "copy_tbps": common.copy_ceiling()}
    print("ceilings:", ceilings, flush=True)
    rows, columns, path = common.run_op(mod, _OP.value, _QUICK.value, ceilings, _OUT.value)
    print(f"wrote {path}")
    print(common.markdown_table(rows, columns))


if __name__ == "__main__":
    app.run(main)
