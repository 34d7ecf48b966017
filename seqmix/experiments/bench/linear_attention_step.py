"""One decoding token of linear attention for a batch of rows: ``xla`` and ``pallas_triton``.

    python -m seqmix.experiments.bench_kernels --op=linear_attention_step [--quick]
    python -m seqmix.experiments.bench_kernels --op=linear_attention_step --tune --tuning_out=t.json

H = 16, K = V = 128, scalar decay, bf16 q, k, v, float32 state ``[B, 16, 128, 128]`` (1 MB a
row); B = 1 ... 256. A step reads and writes the state once, so its floor is the state's
bytes at the copy ceiling ("of_copy" is the fraction reached). Rows record the relative
error of each implementation against ``xla``. Auto dispatch runs this op in XLA until these
rows say otherwise. ``--tune`` runs the autotuner over ``tuning.SEARCH`` at B = 64.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from seqmix.experiments.bench import common
from seqmix.kernels import linear_attention_step

DTYPE = jnp.bfloat16
LA = dict(H=16, K=128, V=128)


def case(B: int):
    """``(label, make(impl), args, bytes)`` at batch ``B``."""
    ks = jax.random.split(jax.random.key(0), 5)
    H, K, V = LA["H"], LA["K"], LA["V"]
    q = jax.random.normal(ks[0], (B, H, K), DTYPE)
    k = jax.random.normal(ks[1], (B, H, K), DTYPE) * K**-0.5
    v = jax.random.normal(ks[2], (B, H, V), DTYPE)
    state = jax.random.normal(ks[3], (B, H, K, V), jnp.float32)
    g = jax.nn.log_sigmoid(jax.random.normal(ks[4], (B, H), jnp.float32)) / 16
    nbytes = 2 * state.size * 4 + (q.size + k.size + 2 * v.size) * 2 + g.size * 4

    def make(impl):
        return jax.jit(
            lambda q, k, v, s, g: linear_attention_step(q, k, v, s, g, implementation=impl)
        )

    return f"{B}x{H}x{K}x{V}", make, (q, k, v, state, g), nbytes


def run(quick: bool = False, ceilings: dict | None = None):
    """Rows and the columns to print."""
    return common.run_steps("linear_attention_step", case, quick, ceilings)


def tune(quick: bool, out: str | None) -> list:
    """Autotunes the Triton step at B = 64 (B = 4 when quick)."""
    B = 4 if quick else 64
    label, _, args, _ = case(B)
    return [
        common.autotune(
            linear_attention_step, args, implementation="pallas_triton", out=out, shape=label
        )
    ]
