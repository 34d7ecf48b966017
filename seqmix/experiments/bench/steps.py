"""Decoding-step ops: ``linear_attention_step`` and ``causal_conv1d_step``.

    python -m seqmix.experiments.bench_kernels --op=linear_attention_step   # or causal_conv1d_step

One token for a batch of rows, every implementation available on the platform (seqmix
``xla`` and ``pallas_triton`` on a GPU), bf16 inputs:

- ``linear_attention_step``: H = 16, K = V = 128, scalar decay, float32 state
  ``[B, 16, 128, 128]`` (1 MB a row); B = 1 ... 256. A step reads and writes the state once,
  so its floor is the state's bytes at the copy ceiling ("of_copy" is the fraction reached).
- ``causal_conv1d_step``: C = 3072, width 4, bias and SiLU, state ``[B, 3, C]``; B = 1 ... 256.
  Its bytes are tiny: the time is the launch.

Auto dispatch runs both ops in XLA on every platform until these rows say otherwise.
Rows record the relative error of each implementation against ``xla``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from seqmix.experiments.bench import common
from seqmix.kernels import causal_conv1d_step, linear_attention_step

DTYPE = jnp.bfloat16
IMPLS = ("xla", "pallas_triton")
BATCHES = (1, 16, 64, 256)
QUICK_BATCHES = (4,)
LA = dict(H=16, K=128, V=128)
CONV = dict(C=3072, W=4)
COLUMNS = ["label", "impl", "us", "gbs", "of_copy", "err", "error"]


def _la_case(B: int):
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


def _conv_case(B: int):
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


CASES = {"linear_attention_step": _la_case, "causal_conv1d_step": _conv_case}


def run(op: str, quick: bool = False, ceilings: dict | None = None):
    copy = (ceilings or {}).get("copy_tbps")
    rows = common.new_rows()
    for B in QUICK_BATCHES if quick else BATCHES:
        label, make, args, nbytes = CASES[op](B)
        ref = None
        for impl in IMPLS:
            row = {"op": op, "impl": impl, "label": label, "B": B, "bytes": nbytes}
            fn = make(impl)
            out = common.attempt(row, "step", lambda fn=fn: fn(*args))
            if out is not None:
                t = common.attempt(row, "step", lambda fn=fn: common.time_jax(fn, *args))
                if t is not None:
                    row.update(us=t * 1e6, gbs=nbytes / t / 1e9)
                    if copy:
                        row["of_copy"] = row["gbs"] / (copy * 1e3)
                if impl == "xla":
                    ref = out
                elif ref is not None:
                    row["err"] = max(common.rel_err(a, r) for a, r in zip(out, ref))
            print({key: row.get(key) for key in COLUMNS}, flush=True)
            rows.append(row)
    return rows, COLUMNS
