"""The short causal convolution: implementations side by side.

    python -m seqmix.experiments.bench_kernels --op=causal_conv1d [--quick]
    python -m seqmix.experiments.bench_kernels --op=causal_conv1d --tune --tuning_out=t.json

``[B, T, 3072]`` width 4, bf16, bias and SiLU, ``B * T = 32k``, T = 1k, 4k, 16k, and the
convolution in front of the selective scan's headline shapes, [8, 4096, 1536] and
[2, 16384, 1536] (the quick run's rows; on a CPU, a dry run of one tiny shape with the
Pallas kernels in interpret mode): seqmix
``pallas_triton`` against ``xla``, with two other tile choices at 4k through the public op's
``config=`` (``variants``). No peer: the causal_conv1d CUDA package has no wheel on the
device. Columns as in ``selective_scan`` (read-once-write-once bandwidth and the ratio to the
copy ceiling, errors against ``xla``). ``--tune`` runs the autotuner over
``tuning.SEARCH`` at [8, 4096, 3072]. ``SEQMIX_BENCH_FILTER=<substring>`` keeps only the
shapes whose label contains it.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp

from seqmix.experiments.bench import common
from seqmix.kernels import dispatch
from seqmix.kernels.conv1d.tuning import TritonConfig

TOKENS = 32768
DTYPE = jnp.bfloat16
CONV = dict(C=3072, W=4)
COLUMNS = common.ROWO_COLUMNS


# The convolution in front of the selective scan's headline shapes, [8, 4096, 1536] and
# [2, 16384, 1536] width 4: rows of every run (the quick run's only ones).
MAMBA = [dict(label=f"{B}x{T}x1536 w4", B=B, T=T, C=1536, W=4) for B, T in ((8, 4096), (2, 16384))]
# The CPU dry run: one tiny ragged shape, the Pallas kernels in interpret mode.
CPU_SHAPE = dict(label="dry 2x37x48 w4", B=2, T=37, C=48, W=4)


def shapes(quick: bool) -> list[dict]:
    if dispatch.platform() == "cpu":
        return [CPU_SHAPE]
    lengths = () if quick else (1024, 4096, 16384)
    return common.filtered(
        MAMBA
        + [
            dict(label=f"{TOKENS // T}x{T}x{CONV['C']} w{CONV['W']}", B=TOKENS // T, T=T, **CONV)
            for T in lengths
        ]
    )


def inputs(B: int, T: int, C: int, W: int):
    """``((x, weight, bias), dy)`` at one shape."""
    ks = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(ks[0], (B, T, C), DTYPE)
    w = 0.5 * jax.random.normal(ks[1], (W, C), jnp.float32)
    b = jax.random.normal(ks[2], (C,), jnp.float32)
    dy = jax.random.normal(ks[3], (B, T, C), DTYPE)
    return (x, w, b), dy


def conv_fn(impl: str, config: TritonConfig | None = None):
    """The public op at ``implementation=impl`` (with ``config``) on ``inputs``' arguments."""

    interpret = dispatch.platform() == "cpu" and impl.startswith("pallas")

    def f(x, w, b):
        from seqmix.kernels import causal_conv1d
        from seqmix.kernels import interpret as interpret_mode

        with interpret_mode() if interpret else contextlib.nullcontext():
            return causal_conv1d(x, w, b, activation="silu", implementation=impl, config=config)

    return f


def variants() -> dict[str, TritonConfig]:
    return {
        "pallas_triton[c128 t32]": TritonConfig(block_c=128, block_t=32),
        "pallas_triton[c256 t64 w8]": TritonConfig(block_c=256, block_t=64, num_warps=8),
    }


def run(quick: bool, ceilings: dict) -> tuple[list[dict], list[str]]:
    """Rows and the columns to print."""

    def impls_for(s):
        impls = {"xla": conv_fn("xla"), "pallas_triton": conv_fn("pallas_triton")}
        if not quick and s["T"] == 4096 and s["C"] == CONV["C"]:
            impls.update({k: conv_fn("pallas_triton", c) for k, c in variants().items()})
        return impls

    rows = common.new_rows()
    rows.extend(
        common.iter_shapes(
            shapes(quick),  # row by row: a time limit keeps them
            lambda s: inputs(s["B"], s["T"], s["C"], s["W"]),
            impls_for,
            COLUMNS,
            ceilings.get("copy_tbps"),
        )
    )
    common.plots(rows, "causal_conv1d", f"bf16, C={CONV['C']}, width {CONV['W']}, {TOKENS} tokens")
    return rows, COLUMNS


def tune(quick: bool, out: str | None) -> list:
    """Autotunes the Triton kernels at [8, 4096, 3072] ([2, 2048, 3072] when quick)."""
    from seqmix.kernels import causal_conv1d

    B, T = (2, 2048) if quick else (8, 4096)
    args, _ = inputs(B, T, CONV["C"], CONV["W"])
    return [
        common.autotune(
            causal_conv1d,
            args,
            implementation="pallas_triton",
            kwargs=dict(activation="silu"),
            out=out,
            shape=f"{B}x{T}x{CONV['C']} w{CONV['W']}",
        )
    ]
