"""Chunked linear attention: the Mosaic GPU engine beside pallas_triton and flash-linear-attention.

    python -m seqmix.experiments.bench_kernels --op=linear_attention_mgpu [--quick]
    python -m seqmix.experiments.bench.linear_attention_mgpu --dry_run   # CPU, interpreter

Rows ("series" = "shapes"): [B, T, H, D] in ``SHAPES`` (8 x 4096, 2 x 16384, 1 x 65536 at
H = 16, D = 128, and 8 x 4096 at D = 64), bf16, scalar decay (peer ``chunk_simple_gla``)
and per-channel decay (peer ``chunk_gla``): forward and forward+backward of
``seqmix_pallas_mosaic_gpu`` (the public op with ``implementation="pallas_mosaic_gpu"`` and
a ``tuning.MosaicGpuConfig``), of ``seqmix_pallas_triton`` and of flash-linear-attention on
the same inputs
(decays ``log_sigmoid(N(0, 1)) / 16``, as in ``bench/linear_attention.py``). Per row: ms,
bytes moved against the copy ceiling, tokens/s, and the output's relative error against
pallas_triton and flash-linear-attention (an independent check of the new engine).

Config candidates: ``SEQMIX_BENCH_MGPU_CONFIGS='[{"block_v": 64}, {"split_scores": false}]'``
(a JSON list of ``tuning.MosaicGpuConfig`` fields) adds one mosaic row per entry; unset,
``CANDIDATES`` are timed; ``'[]'`` times the table's Config alone. ``--tune`` runs the
autotuner's search (``tuning.SEARCH``) at 8 x 4096 instead.

Rows ("series" = "scaling"): B * T = 65536 tokens at T = 4k ... 64k, H = 16, D = 128,
scalar decay, forward: time per token should stay flat (the two-level state pass keeps
the SMs busy at small batch).
"""

from __future__ import annotations

import json
import os
import time
import traceback

import jax

from seqmix.experiments.bench import common
from seqmix.experiments.bench import linear_attention as la_bench
from seqmix.kernels import interpret, linear_attention
from seqmix.kernels.linear_attention.mosaic_gpu.plan import make_plan
from seqmix.kernels.linear_attention.tuning import MosaicGpuConfig

SHAPES = la_bench.SHAPES
QUICK_SHAPES = [(2, 4096, 16, 128)]
SCALING_T = la_bench.SCALING_T
QUICK_SCALING_T = [4096, 16384]
SCALING_TOKENS = la_bench.SCALING_TOKENS
DRY_SHAPE = (1, 128, 2, 64)
# Variants timed beside the default Config: narrower value blocks (more programs, less
# SMEM per program), scores in one bf16 part, longer programs, one state pass, the forward's
# states kept for the backward (forward+backward without the second state pass). (A third
# pipeline stage, or value blocks of 128 in the gradient kernels, exceed the 227 KB of
# shared memory at D = 128: the lowering says so.)
CANDIDATES = [
    {"block_v": 64},
    {"split_scores": False},
    {"block_v": 64, "chunks_per_program": 16},
    {"state_segments": 1},
    {"save_states": True},
]
COLUMNS = [
    "series",
    "decay",
    "impl",
    "plan",
    "B",
    "T",
    "H",
    "D",
    "fwd_ms",
    "fwdbwd_ms",
    "fwd_TBps",
    "copy_frac",
    "Mtok_per_s",
    "ns_per_token",
    "rel_err_triton",
    "rel_err_fla",
    "error",
]


def candidates() -> list[dict]:
    env = os.environ.get("SEQMIX_BENCH_MGPU_CONFIGS")
    return CANDIDATES if env is None else json.loads(env)


def mosaic_fns(config: MosaicGpuConfig):
    """Jitted forward and forward+backward of the Mosaic GPU engine with ``config``."""

    def fwd(q, k, v, g):
        return linear_attention(q, k, v, g, implementation="pallas_mosaic_gpu", config=config)

    def fwd_bwd(q, k, v, g, do):
        o, vjp = jax.vjp(fwd, q, k, v, g)
        return o, vjp(do)

    return jax.jit(fwd), jax.jit(fwd_bwd)


def triton_fns():
    def fwd(q, k, v, g):
        return linear_attention(q, k, v, g, implementation="pallas_triton")

    def fwd_bwd(q, k, v, g, do):
        o, vjp = jax.vjp(fwd, q, k, v, g)
        return o, vjp(do)

    return jax.jit(fwd), jax.jit(fwd_bwd)


def describe(config: MosaicGpuConfig, q, v, g) -> str:
    """The plan a call with ``config`` runs: value blocks, pipeline depth, chunks per
    program, segments of the state pass."""
    plan = make_plan(q, v, g, None, None, scale=1.0, chunk_size=64, config=config)
    text = f"v{plan.block_v}/{plan.block_v_grad} d{plan.depth} g{plan.chunks_per_program}"
    if plan.segments > 1:
        text += f" seg {plan.segments}x{plan.segment_chunks}"
    if not plan.split_scores:
        text += " unsplit"
    return text


def _label(overrides: dict) -> str:
    return "seqmix_pallas_mosaic_gpu" + (json.dumps(overrides, sort_keys=True) if overrides else "")


def measure_shape(series, B, T, H, D, decay, ceilings, *, backward=True, peers=True, timer=None):
    """Rows of one shape: every Config candidate of the Mosaic GPU engine, then (with
    ``peers``) pallas_triton and flash-linear-attention."""
    timer = timer or common.time_jax
    rows = common.new_rows()
    q, k, v, g, do = la_bench._inputs(B, T, H, D, decay)
    nbytes, tokens = la_bench._bytes(B, T, H, D, decay), B * T
    outs = {}
    variants = [{}] + [c for c in candidates() if c]
    for overrides in variants:
        row = la_bench._row(series, decay, _label(overrides), B, T, H, D)
        rows.append(row)
        try:
            config = MosaicGpuConfig(**overrides)
            row["plan"] = describe(config, q, v, g)
            fwd, fwd_bwd = mosaic_fns(config)
            outs[row["impl"]] = fwd(q, k, v, g)
            la_bench._fill_speed(row, timer(fwd, q, k, v, g) * 1e3, nbytes, ceilings, tokens)
            if backward:
                row["fwdbwd_ms"] = timer(fwd_bwd, q, k, v, g, do) * 1e3
        except Exception as e:  # noqa: BLE001 - one failure must not stop the run
            row["error"] = la_bench._error(e)
            traceback.print_exc()
    if peers:
        row = la_bench._row(series, decay, "seqmix_pallas_triton", B, T, H, D)
        rows.append(row)
        try:
            fwd, fwd_bwd = triton_fns()
            outs["triton"] = fwd(q, k, v, g)
            la_bench._fill_speed(row, timer(fwd, q, k, v, g) * 1e3, nbytes, ceilings, tokens)
            if backward:
                row["fwdbwd_ms"] = timer(fwd_bwd, q, k, v, g, do) * 1e3
        except Exception as e:  # noqa: BLE001
            row["error"] = la_bench._error(e)
        row = la_bench._row(series, decay, f"fla_{la_bench.FLA_OPS[decay][1]}", B, T, H, D)
        rows.append(row)
        try:
            forward, forward_backward, outs["fla"] = la_bench._fla(decay, q, k, v, g, do)
            ms = common.time_torch(forward) * 1e3
            la_bench._fill_speed(row, ms, nbytes, ceilings, tokens)
            if backward:
                try:
                    row["fwdbwd_ms"] = common.time_torch(forward_backward) * 1e3
                except Exception as e:  # noqa: BLE001 - refuses on some Triton versions
                    row["error"] = "backward: " + la_bench._error(e)
        except Exception as e:  # noqa: BLE001 - no fla / torch on this machine
            row["error"] = la_bench._error(e)
    for row in rows:
        out = outs.get(row["impl"])
        if out is None or row["impl"].startswith("fla"):
            continue
        if "triton" in outs and row["impl"] != "seqmix_pallas_triton":
            row["rel_err_triton"] = common.rel_err(out, outs["triton"])
        if "fla" in outs:
            row["rel_err_fla"] = common.rel_err(out, outs["fla"])
    return rows


def run(quick: bool = False, ceilings: dict | None = None):
    """Benchmark rows and the table's columns (see the module docstring)."""
    ceilings = ceilings or {}
    rows = []
    for B, T, H, D in QUICK_SHAPES if quick else SHAPES:
        for decay in ("scalar", "channel"):
            shape_rows = measure_shape("shapes", B, T, H, D, decay, ceilings)
            rows += shape_rows
            print(common.markdown_table(shape_rows, COLUMNS), flush=True)
    for T in QUICK_SCALING_T if quick else SCALING_T:
        shape_rows = measure_shape(
            "scaling", SCALING_TOKENS // T, T, 16, 128, "scalar", ceilings, backward=False
        )
        rows += shape_rows
        print(common.markdown_table(shape_rows, COLUMNS), flush=True)
    return rows, COLUMNS


def _once(fn, *args) -> float:
    """Seconds of one call after compilation (the interpreter is too slow to repeat)."""
    jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - t0


def dry_run() -> list[dict]:
    """Every Mosaic GPU row at ``DRY_SHAPE`` through the Mosaic GPU interpreter on the CPU
    (peers skipped): exercises the benchmark's code paths without a GPU."""
    B, T, H, D = DRY_SHAPE
    rows = []
    with interpret():
        for decay in ("scalar", "channel"):
            rows += measure_shape("dry", B, T, H, D, decay, {}, peers=False, timer=_once)
    print(common.markdown_table(rows, COLUMNS), flush=True)
    return rows


def main(argv):
    del argv
    from absl import flags

    if flags.FLAGS.dry_run:
        rows = dry_run()
        if any(r.get("error") for r in rows):
            raise SystemExit(
                "dry run failed: " + "; ".join(r["error"] for r in rows if "error" in r)
            )
        return
    ceilings = {"bf16_matmul_tflops": common.matmul_ceiling(), "copy_tbps": common.copy_ceiling()}
    rows, columns, path = common.run_op(
        __import__(__name__, fromlist=["run"]), "linear_attention_mgpu", False, ceilings, None
    )
    print(f"wrote {path}")
    print(common.markdown_table(rows, columns))


def tune(quick: bool, out: str | None) -> list:
    """Autotunes the Mosaic GPU engine at ``[8, 4096, 16, 128]`` (``QUICK_SHAPES`` when
    quick) for the scalar and the per-channel decay; returns the ``tune.Result`` of each."""
    B, T, H, D = QUICK_SHAPES[0] if quick else SHAPES[0]
    results = []
    for decay in ("scalar", "channel"):
        q, k, v, g, _ = la_bench._inputs(B, T, H, D, decay)
        results.append(
            common.autotune(
                linear_attention,
                (q, k, v, g),
                implementation="pallas_mosaic_gpu",
                out=out,
                shape=f"{B}x{T}x{H}x{D} {decay}",
            )
        )
    return results


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_bool("dry_run", False, "Tiny shape through the interpreter on the CPU.")
    app.run(main)
