"""Chunked gated linear attention in Pallas Triton: the ``pallas_triton`` implementation of
``seqmix.kernels.linear_attention`` (padding and the custom VJP over the kernels).

The backward (``jax.custom_vjp``) recomputes the chunk states (or takes the forward's,
``TritonConfig(save_states=True)``), runs the reverse pass over
chunks for the state gradients (``state.chunk_state_grads``) and then the per-chunk
gradient kernels (``backward.chunk_dv`` and ``chunk_dqk``: dq, dk and the log-decay
gradient); d initial_state is the reverse pass's last state gradient.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from seqmix.kernels.common import pad_axes
from seqmix.kernels.linear_attention import reference
from seqmix.kernels.linear_attention.triton import backward, forward, state
from seqmix.kernels.linear_attention.triton.plan import Plan, make_plan


@reference.masks_nonfinite_if_poisoned
def linear_attention(q, k, v, g, *, scale, initial_state, runs, chunk_size=64, config=None):
    """``(o [B, T, Hv, V] in q's dtype, final_state [B, Hv, K, V] float32)``.

    q, k ``[B, T, Hqk, K]``; v ``[B, T, Hv, V]``; g None, ``[B, T, Hv]`` or
    ``[B, T, Hv, K]`` float32 (<= 0); initial_state float32 ``[B, Hv, K, V]`` or None; runs
    None or ``[B, T]`` int32 non-decreasing (the state resets where it changes).
    ``config``: ``tuning.TritonConfig`` (None: the table's). Differentiable in q, k, v, g,
    initial_state.
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
    if g is not None:
        g = pad_axes(g.astype(jnp.float32), {1: Tp} if g.ndim == 3 else {1: Tp, 3: Kp})
    if runs is not None:
        runs = pad_axes(runs.astype(jnp.int32), {1: Tp}, mode="edge")
    if initial_state is not None:
        initial_state = pad_axes(initial_state.astype(jnp.float32), {2: Kp, 3: Vp})
    o, final = _chunked(plan, q, k, v, g, initial_state, runs)
    return o[:, :T, :, :V], final[:, :, :K, :V]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _chunked(plan: Plan, q, k, v, g, initial_state, runs):
    states, final, segments = state.chunk_states(plan, k, v, g, runs, initial_state)
    return forward.chunk_output(plan, q, k, v, g, runs, states, segments), final


def _chunked_fwd(plan, q, k, v, g, initial_state, runs):
    inputs = (q, k, v, g, initial_state, runs)
    if not plan.save_states:
        return _chunked(plan, *inputs), (*inputs, None)
    states, final, segments = state.chunk_states(plan, k, v, g, runs, initial_state)
    o = forward.chunk_output(plan, q, k, v, g, runs, states, segments)
    return (o, final), (*inputs, (states, segments))


def _chunked_bwd(plan, residuals, cotangents):
    q, k, v, g, initial_state, runs, saved = residuals
    do, dfinal = cotangents
    do = do.astype(q.dtype)
    if saved is None:
        states, _, segments = state.chunk_states(plan, k, v, g, runs, initial_state)
    else:
        states, segments = saved
    dstates, dinit, dsegments = state.chunk_state_grads(
        plan,
        q,
        do,
        g,
        runs,
        dfinal.astype(jnp.float32),
        decays=None if segments is None else segments[2],
    )
    dv = backward.chunk_dv(plan, q, k, g, runs, do, dstates, dsegments)
    G = plan.groups
    grad_dtype = q.dtype if G == 1 else jnp.float32
    dq, dk, dg = backward.chunk_dqk(
        plan, q, k, v, g, runs, do, states, dstates, grad_dtype, segments, dsegments
    )
    if G > 1:
        B, T, _, K = q.shape
        dq = dq.reshape(B, T, plan.qk_heads, G, K).sum(3).astype(q.dtype)
        dk = dk.reshape(B, T, plan.qk_heads, G, K).sum(3).astype(k.dtype)
    if dg is not None and g.ndim == 3:
        dg = dg.sum(0) if dg.shape[0] > 1 else dg[0]
    return (dq, dk, dv, dg, dinit if initial_state is not None else None, None)


_chunked.defvjp(_chunked_fwd, _chunked_bwd)
