"""One decoding step of the gated delta rule for a batch of rows, as a Pallas Triton kernel.

    S' = exp(g) S,   S'' = S' + beta k (v - k^T S')^T,   o = scale * S''^T q

q, k ``[B, Hqk, K]``; v ``[B, Hv, V]``; beta ``[B, Hv]``; state float32 ``[B, Hv, K, V]``;
g None or ``[B, Hv]``. v head ``h`` reads q/k head ``h // (Hv // Hqk)``. Returns
``(o [B, Hv, V] in q's dtype, new_state float32)``.

The step reads and writes the state once (memory bound); one program per (value block,
batch * v head) holds the ``[K, block]`` slice whole, since the prediction ``k^T S`` sums
over the key dimension.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from seqmix.kernels import dispatch
from seqmix.kernels.common import pad_axes, pow2_at_least, round_up
from seqmix.kernels.delta_rule import tuning


def _step_kernel(*refs, scale: float, has_decay: bool):
    it = iter(refs)
    q_ref, k_ref, v_ref, beta_ref = next(it), next(it), next(it), next(it)
    g_ref = next(it) if has_decay else None
    s_ref, o_ref, ns_ref = next(it), next(it), next(it)
    S = s_ref[...]
    if g_ref is not None:
        S = S * jnp.exp(g_ref[...])[:, None]
    k = k_ref[...].astype(jnp.float32)
    pred = jnp.sum(k[:, None] * S, axis=0)
    beta = jnp.max(beta_ref[...])  # 16 equal lanes: Triton blocks are >= 16 wide
    delta = beta * (v_ref[...].astype(jnp.float32) - pred)
    S = S + k[:, None] * delta[None, :]
    ns_ref[...] = S
    o = jnp.sum(q_ref[...].astype(jnp.float32)[:, None] * S, axis=0)
    o_ref[...] = (scale * o).astype(o_ref.dtype)


def gated_delta_rule_step(q, k, v, beta, state, g, *, scale, config=None):
    """The step above (interpret mode on the CPU when ``seqmix.kernels.interpret()`` is on).
    ``config``: ``tuning.TritonStepConfig`` (None: the table's)."""
    cfg = tuning.triton_step_config(config, interpret=dispatch.interpret_mode())
    B, Hqk, K = q.shape
    Hv, V = v.shape[1], v.shape[2]
    G = Hv // Hqk
    Kp = pow2_at_least(max(K, 16))
    bv = max(16, min(cfg.block_v, pow2_at_least(V)))
    Vp = round_up(V, bv)
    q, k = pad_axes(q, {2: Kp}), pad_axes(k, {2: Kp})
    v = pad_axes(v, {2: Vp})
    state = pad_axes(state.astype(jnp.float32), {2: Kp, 3: Vp})

    def heads(bh):
        return bh // Hv, bh % Hv, (bh % Hv) // G

    qk_spec = pl.BlockSpec((None, None, Kp), lambda x, bh: (heads(bh)[0], heads(bh)[2], 0))
    v_spec = pl.BlockSpec((None, None, bv), lambda x, bh: (heads(bh)[0], heads(bh)[1], x))
    s_spec = pl.BlockSpec((None, None, Kp, bv), lambda x, bh: (heads(bh)[0], heads(bh)[1], 0, x))
    head_spec = pl.BlockSpec((None, None, 16), lambda x, bh: (heads(bh)[0], heads(bh)[1], 0))
    # beta travels as 16 equal lanes per head (the smallest Triton block)
    beta16 = jnp.broadcast_to(beta.astype(jnp.float32)[..., None], (B, Hv, 16))
    specs, args = [qk_spec, qk_spec, v_spec, head_spec], [q, k, v, beta16]
    if g is not None:
        g = jnp.broadcast_to(g.astype(jnp.float32)[..., None], (B, Hv, Kp))
        specs.append(pl.BlockSpec((None, None, Kp), lambda x, bh: (heads(bh)[0], heads(bh)[1], 0)))
        args.append(g)
    specs.append(s_spec)
    args.append(state)
    o, new_state = pl.pallas_call(
        functools.partial(_step_kernel, scale=float(scale), has_decay=g is not None),
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
        name="gated_delta_rule_step",
    )(*args)
    return o[..., :V], new_state[:, :, :K, :V]
