"""The chunked gated delta rule on TPU: the ``pallas_tpu`` implementation of
``seqmix.kernels.delta_rule``.

Stages as ``reference.gated_delta_rule_xla``: the WY transform of every chunk is a Pallas
TPU kernel with its own backward kernel (``wy.py``); the state pass over chunks and linear
attention's output pass run in XLA (``reference.state_pass``, ``linear_attention.reference
.output_pass``) and are differentiated by JAX. Inputs are computed in float32 (bf16/fp16
inputs are upcast); the output has q's dtype.
"""

from __future__ import annotations

import jax.numpy as jnp

from seqmix.kernels.common import round_up
from seqmix.kernels.delta_rule import reference, tuning
from seqmix.kernels.delta_rule.tpu.wy import wy_transform
from seqmix.kernels.dispatch import interpret_mode
from seqmix.kernels.linear_attention import reference as la


def _heads_major(x):
    """``[B, n, C, H, ...]`` -> ``[B, H, n, C, ...]``."""
    return jnp.moveaxis(x, 3, 1)


@reference.masks_nonfinite_if_poisoned
def gated_delta_rule(q, k, v, beta, g, *, scale, initial_state, runs, chunk_size=64, config=None):
    """``(o [B, T, Hv, V] in q's dtype, final_state [B, Hv, K, V] float32)``; arguments as
    ``reference.gated_delta_rule_xla``. ``config``: ``tuning.TpuConfig`` (None: the
    table's). Differentiable in q, k, v, beta, g and initial_state."""
    dtype = jnp.dtype(q.dtype)
    if dtype.name not in ("bfloat16", "float16", "float32"):
        raise NotImplementedError(
            f"pallas_tpu gated_delta_rule supports bf16/fp16/fp32 inputs, got {dtype}"
        )
    cfg = tuning.tpu_config(config, interpret=interpret_mode())
    cps = cfg.chunks_per_step
    if not isinstance(cps, int) or cps < 1:
        raise ValueError(f"TpuConfig.chunks_per_step must be a positive int, got {cps!r}")
    out_dtype = q.dtype
    B, T = q.shape[:2]
    q, k, v, g4, s0 = la.expand(q, k, v, g, initial_state)
    beta = beta.astype(s0.dtype)
    H, V = v.shape[2], v.shape[3]
    C = chunk_size
    n = round_up(-(-T // C), cps)
    q, k, v, g4, beta = (la.to_chunks(x, n, C) for x in (q, k, v, g4, beta))
    runs, r_last, r_prev = la.chunk_runs(runs, B, T, n, C)
    b = jnp.cumsum(g4[..., 0], axis=2)  # [B, n, C, H]
    keep = (runs == r_prev[..., None]).astype(jnp.float32)[:, None]  # [B, 1, n, C]
    w, u = wy_transform(
        _heads_major(k),
        _heads_major(v),
        _heads_major(beta),
        _heads_major(b),
        keep,
        runs.astype(jnp.float32)[:, None],
        cps,
        g is not None,
    )
    w, u = jnp.moveaxis(w, 1, 3), jnp.moveaxis(u, 1, 3)  # back to [B, n, C, H, ...]
    v_new, s_in, final = reference.state_pass(k, w, u, b, s0, runs, r_last, r_prev)
    o = la.output_pass(q, k, v_new, b[..., None], s_in, runs, r_prev, scale=scale)
    return o.reshape(B, n * C, H, V)[:, :T].astype(out_dtype), final
