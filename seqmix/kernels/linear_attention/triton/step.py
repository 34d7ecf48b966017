"""One decoding step of gated linear attention for a batch of rows, as a Pallas Triton kernel.

    S' = exp(g) * S + k v^T,      o = scale * q^T S'

q, k ``[B, Hqk, K]``; v ``[B, Hv, V]``; state float32 ``[B, Hv, K, V]``; g None, ``[B, Hv]``
(scalar per head) or ``[B, Hv, K]`` (per key channel). v head ``h`` reads q/k head
``h // (Hv // Hqk)``. Returns ``(o [B, Hv, V] in q's dtype, new_state float32)``.

The step reads and writes the state once: it is memory bound, one program per (value
block, batch * v head) streams the ``[K, block]`` slice of the state in key blocks.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from seqmix.kernels import dispatch
from seqmix.kernels.common import pad_axes, pow2_at_least, round_up
from seqmix.kernels.linear_attention import tuning


def _step_kernel(*refs, scale: float, has_decay: bool, block_k: int):
    it = iter(refs)
    q_ref, k_ref, v_ref = next(it), next(it), next(it)
    g_ref = next(it) if has_decay else None
    s_ref, o_ref, ns_ref = next(it), next(it), next(it)
    v = v_ref[...].astype(jnp.float32)
    o = jnp.zeros(v.shape, jnp.float32)
    for kb in range(s_ref.shape[0] // block_k):
        rows = pl.ds(kb * block_k, block_k)
        S = s_ref[rows, :]
        if g_ref is not None:
            S = S * jnp.exp(g_ref[rows])[:, None]
        S = S + k_ref[rows].astype(jnp.float32)[:, None] * v[None, :]
        ns_ref[rows, :] = S
        o = o + jnp.sum(q_ref[rows].astype(jnp.float32)[:, None] * S, axis=0)
    o_ref[...] = (scale * o).astype(o_ref.dtype)


def linear_attention_step(q, k, v, state, g, *, scale, config=None):
    """The step above as a Pallas Triton kernel (interpret mode on CPU when
    ``seqmix.kernels.interpret()`` is on). ``config``: ``tuning.TritonStepConfig`` (None:
    the table's)."""
    cfg = tuning.triton_step_config(config, interpret=dispatch.interpret_mode())
    B, Hqk, K = q.shape
    Hv, V = v.shape[1], v.shape[2]
    G = Hv // Hqk
    bk = max(16, min(cfg.block_k, pow2_at_least(K)))
    bv = max(16, min(cfg.block_v, pow2_at_least(V)))
    Kp, Vp = round_up(K, bk), round_up(V, bv)

    q, k = pad_axes(q, {2: Kp}), pad_axes(k, {2: Kp})
    v = pad_axes(v, {2: Vp})
    state = pad_axes(state.astype(jnp.float32), {2: Kp, 3: Vp})

    def heads(bh):
        return bh // Hv, bh % Hv, (bh % Hv) // G

    qk_spec = pl.BlockSpec((None, None, Kp), lambda x, bh: (heads(bh)[0], heads(bh)[2], 0))
    v_spec = pl.BlockSpec((None, None, bv), lambda x, bh: (heads(bh)[0], heads(bh)[1], x))
    s_spec = pl.BlockSpec((None, None, Kp, bv), lambda x, bh: (heads(bh)[0], heads(bh)[1], 0, x))
    specs, args = [qk_spec, qk_spec, v_spec], [q, k, v]
    if g is not None:
        g = g.astype(jnp.float32)
        g = jnp.broadcast_to(g[..., None], (B, Hv, K)) if g.ndim == 2 else g
        specs.append(pl.BlockSpec((None, None, Kp), lambda x, bh: (heads(bh)[0], heads(bh)[1], 0)))
        args.append(pad_axes(g, {2: Kp}))
    specs.append(s_spec)
    args.append(state)
    o, new_state = pl.pallas_call(
        functools.partial(_step_kernel, scale=float(scale), has_decay=g is not None, block_k=bk),
        grid=(Vp // bv, B * Hv),
        in_specs=specs,
        out_specs=[v_spec, s_spec],
        out_shape=[
            jax.ShapeDtypeStruct((B, Hv, Vp), q.dtype),
            jax.ShapeDtypeStruct((B, Hv, Kp, Vp), jnp.float32),
        ],
        input_output_aliases={len(args) - 1: 1},
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=dispatch.interpret_mode(),
        name="linear_attention_step",
    )(*args)
    return o[..., :V], new_state[:, :, :K, :V]
