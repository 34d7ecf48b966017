"""One decoding token of the causal convolution for a batch of rows: ``xla`` and
``pallas_triton``.

    python -m seqmix.experiments.bench_kernels --op=causal_conv1d_step [--quick]
    python -m seqmix.experiments.bench_kernels --op=causal_conv1d_step --tune --tuning_out=t.json

C = 3072, width 4, bias and SiLU, state ``[B, 3, C]``; B = 1 ... 256. Its bytes are tiny:
the time is the launch. Rows record the relative error of each implementation against
``xla``. Auto dispatch runs this op in XLA until these rows say otherwise. ``--tune`` runs
the autotuner over ``tuning.SEARCH`` at B = 64.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from seqmix.experiments.bench import common
from seqmix.kernels import causal_conv1d_step

DTYPE = jnp.bfloat16
CONV = dict(C=3072, W=4)


def case(B: int):
    """``(label, make(impl), args, bytes)`` at batch ``B``."""
    ks = jax.random.split(jax.random.key(0), 4)
    C, W = CONV["C"], CONV["W"]
    x = jax.random.normal(ks[0], (B, C), DTYPE)
    state = jax.random.normal(ks[1], (B, W - 1, C), DTYPE)
    w = 0.5 * jax.random.normal(ks[2], (W, C), jnp.float32)
    b = jax.random.normal(ks[3], (C,), jnp.float32)
    nbytes = (2 * x.size + 2 * state.size) * 2 + (w.size + b.size) * 4

    def make(impl):
        return jax.jit(
            lambda x, s, w, b: causal_conv1d_step(
                x, s, w, b, activation="silu", implementation=impl
            )
        )

    return f"{B}x{C} w{W}", make, (x, state, w, b), nbytes


def run(quick: bool = False, ceilings: dict | None = None):
    """Rows and the columns to print."""
    return common.run_steps("causal_conv1d_step", case, quick, ceilings)


def tune(quick: bool, out: str | None) -> list:
    """Autotunes the Triton step at B = 64 (B = 4 when quick)."""
    B = 4 if quick else 64
    label, _, args, _ = case(B)
    return [
        common.autotune(
            causal_conv1d_step,
            args,
            implementation="pallas_triton",
            kwargs=dict(activation="silu"),
            out=out,
            shape=label,
        )
    ]
