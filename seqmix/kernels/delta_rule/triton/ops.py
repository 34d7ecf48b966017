"""The chunked gated delta rule in Pallas Triton: the ``pallas_triton`` implementation of
``seqmix.kernels.delta_rule`` (padding and the custom VJP over the kernels).

Forward: ``wy.wy_forward`` (w, u per chunk) -> ``state.chunk_states`` (the states entering
the chunks and the pseudo-values ``v_new``) -> the linear-attention engine's
``forward.chunk_output`` with ``v_new`` as values.

Backward (``jax.custom_vjp``): recompute w, u, the states and ``v_new`` (or take them from
the forward, ``TritonConfig(save_states=True)``); the reverse pass
``state.chunk_state_grads`` (``dS_{c+1}``, ``dv_new``, d initial_state); the linear-
attention engine's ``backward.chunk_dqk`` on ``(q, k, v_new)`` for dq, the direct part of
dk and of d log_decay; ``wy.wy_backward`` for dv, dbeta and the WY parts of dk and
d log_decay.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from seqmix.kernels.common import pad_axes
from seqmix.kernels.delta_rule import reference
from seqmix.kernels.delta_rule.triton import state, wy
from seqmix.kernels.delta_rule.triton.plan import DeltaPlan, make_plan
from seqmix.kernels.linear_attention.triton import backward as la_backward
from seqmix.kernels.linear_attention.triton import forward as la_forward

f32 = jnp.float32


@reference.masks_nonfinite_if_poisoned
def gated_delta_rule(q, k, v, beta, g, *, scale, initial_state, runs, chunk_size=64, config=None):
    """``(o [B, T, Hv, V] in q's dtype, final_state [B, Hv, K, V] float32)``.

    q, k ``[B, T, Hqk, K]``; v ``[B, T, Hv, V]``; beta float32 ``[B, T, Hv]``; g None or
    float32 ``[B, T, Hv]`` (<= 0); initial_state float32 ``[B, Hv, K, V]`` or None; runs
    None or ``[B, T]`` int32 non-decreasing. ``config``: ``tuning.TritonConfig`` (None: the
    table's). Differentiable in q, k, v, beta, g and initial_state.
    """
    _B, T, _, K = q.shape
    V = v.shape[3]
    plan = make_plan(
        q, v, g, initial_state, runs, scale=scale, chunk_size=chunk_size, config=config
    )
    Tp, Kp, Vp = plan.time, plan.key_dim, plan.value_dim
    q = pad_axes(q, {1: Tp, 3: Kp})
    k = pad_axes(k, {1: Tp, 3: Kp})
    v = pad_axes(v, {1: Tp, 3: Vp})
    beta = pad_axes(beta.astype(f32), {1: Tp})  # beta = 0: padded tokens change nothing
    if g is not None:
        g = pad_axes(g.astype(f32), {1: Tp})
    if runs is not None:
        runs = pad_axes(runs.astype(jnp.int32), {1: Tp}, mode="edge")
    if initial_state is not None:
        initial_state = pad_axes(initial_state.astype(f32), {2: Kp, 3: Vp})
    o, final = _chunked(plan, q, k, v, beta, g, initial_state, runs)
    return o[:, :T, :, :V], final[:, :, :K, :V]


def _states(plan: DeltaPlan, k, v, beta, g, initial_state, runs):
    w, u = wy.wy_forward(plan, k, v, beta, g, runs)
    states, v_new, final = state.chunk_states(plan, k, w, u, g, runs, initial_state, v.dtype)
    return w, states, v_new, final


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _chunked(plan: DeltaPlan, q, k, v, beta, g, initial_state, runs):
    _, states, v_new, final = _states(plan, k, v, beta, g, initial_state, runs)
    return la_forward.chunk_output(plan, q, k, v_new, g, runs, states), final


def _chunked_fwd(plan, q, k, v, beta, g, initial_state, runs):
    inputs = (q, k, v, beta, g, initial_state, runs)
    if not plan.save_states:
        return _chunked(plan, *inputs), (*inputs, None)
    w, states, v_new, final = _states(plan, k, v, beta, g, initial_state, runs)
    o = la_forward.chunk_output(plan, q, k, v_new, g, runs, states)
    return (o, final), (*inputs, (w, states, v_new))


def _chunked_bwd(plan, residuals, cotangents):
    q, k, v, beta, g, initial_state, runs, saved = residuals
    do, dfinal = cotangents
    do = do.astype(q.dtype)
    if saved is None:
        w, states, v_new, _ = _states(plan, k, v, beta, g, initial_state, runs)
    else:
        w, states, v_new = saved
    dstates, dv_new, dinit = state.chunk_state_grads(plan, q, k, w, do, g, runs, dfinal.astype(f32))
    dq, dk, dg = la_backward.chunk_dqk(plan, q, k, v_new, g, runs, do, states, dstates, f32)
    dk_wy, dv, dbeta, dg_wy = wy.wy_backward(plan, k, v, beta, g, runs, states, dv_new)
    dk = dk + dk_wy
    B, T, _, K = q.shape
    G = plan.groups
    if G > 1:
        dq = dq.reshape(B, T, plan.qk_heads, G, K).sum(3)
        dk = dk.reshape(B, T, plan.qk_heads, G, K).sum(3)
    if g is not None:
        dg = dg.sum(0) + dg_wy
    return (
        dq.astype(q.dtype),
        dk.astype(k.dtype),
        dv,
        dbeta,
        dg,
        dinit if initial_state is not None else None,
        None,
    )


_chunked.defvjp(_chunked_fwd, _chunked_bwd)
