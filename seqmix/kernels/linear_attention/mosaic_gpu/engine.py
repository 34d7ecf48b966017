"""Entry point of the Mosaic GPU engine: padding, the decay and run preprocessing in XLA,
the kernel sequence and its ``jax.custom_vjp``.

Preprocessing (cheap elementwise XLA on ``[B, T, H(, K)]`` arrays): ``b``, the inclusive
cumulative sum of the log decays inside every chunk (float32; the kernels differentiate
with respect to ``b`` and XLA's transpose of the cumsum turns ``db`` into ``d log_decay``);
and, for packed sequences, ``masks [B, 3, T]``: whether token ``t`` is in the run of the
token before its chunk (``keep_prev``), in the run of its chunk's last token
(``keep_last``), and its run index.

Forward: ``state.state_pass`` (the chunk states), ``forward.chunk_output``. Backward:
the states again, the reverse pass for the state gradients, then ``backward``'s per-chunk
gradient kernels.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from seqmix.kernels.linear_attention import reference
from seqmix.kernels.linear_attention.mosaic_gpu import backward, channel_kernels, forward, state
from seqmix.kernels.linear_attention.mosaic_gpu.plan import Plan, make_plan
from seqmix.kernels.linear_attention.tuning import MosaicGpuConfig

F32 = jnp.float32


def _pad(x, sizes, mode="constant"):
    if x is None:
        return None
    pads = [(0, 0)] * x.ndim
    for axis, size in sizes.items():
        pads[axis] = (0, size - x.shape[axis])
    if all(p == (0, 0) for p in pads):
        return x
    return jnp.pad(x, pads, mode=mode)


def chunk_cumsum(plan: Plan, g):
    """``b``: the log decays summed inside every chunk (inclusive), float32; scalar decays
    come as ``[B, Hv, T]``, per-channel ones as ``[B, T, Hv, K]`` (both padded)."""
    B, T, n, C, H = plan.batch, plan.time, plan.chunks, plan.chunk, plan.v_heads
    if plan.decay == "scalar":
        g = jnp.swapaxes(_pad(g.astype(F32), {1: T}), 1, 2)  # [B, H, T]
        return jnp.cumsum(g.reshape(B, H, n, C), axis=3).reshape(B, H, T)
    g = _pad(g.astype(F32), {1: T, 3: plan.key_dim})
    return jnp.cumsum(g.reshape(B, n, C, H, -1), axis=2).reshape(B, T, H, -1)


def run_masks(plan: Plan, runs):
    """``[B, 3, T]`` float32: keep_prev, keep_last and the run index of every token."""
    C, n = plan.chunk, plan.chunks
    r = _pad(runs.astype(jnp.int32), {1: plan.time}, mode="edge").reshape(-1, n, C)
    last = r[:, :, -1:]
    prev = jnp.concatenate([r[:, :1, :1], last[:, :-1]], axis=1)
    keep_prev = (r == prev).astype(F32).reshape(-1, plan.time)
    keep_last = (r == last).astype(F32).reshape(-1, plan.time)
    return jnp.stack([keep_prev, keep_last, r.reshape(-1, plan.time).astype(F32)], axis=1)


def chunk_last(plan: Plan, b):
    """``b`` at every chunk's last token: ``[B, Hv, n]`` or ``[B, n, Hv, K]``; None."""
    if b is None:
        return None
    C = plan.chunk
    if plan.decay == "scalar":
        return b[:, :, C - 1 :: C]
    return b[:, C - 1 :: C]


def _carries(plan: Plan, masks):
    """``[B, n]``: 1 where a chunk's state survives to its end, 0 across a run change."""
    return None if masks is None else masks[:, 0, plan.chunk - 1 :: plan.chunk]


def _states(plan: Plan, x, y, b, masks, init, *, reverse: bool):
    """The stored chunk values of one direction and the last one (final state or d
    initial state), with the two-level scheme when ``plan.segments > 1``."""
    b_last = chunk_last(plan, b)
    b_row = b_last if plan.decay == "channel" else None
    if plan.segments == 1:
        first = None if init is None else init[:, :, None]
        states, ends = state.state_pass(
            plan, x, y, b, b_row, masks, first, reverse=reverse, store=True
        )
        return states, ends[:, :, 0]
    _, ends = state.state_pass(plan, x, y, b, b_row, masks, None, reverse=reverse, store=False)
    decays = state.segment_decays(plan, b_last, _carries(plan, masks))
    starts, last = state.combine(decays, ends, init, reverse=reverse)
    states, _ = state.state_pass(plan, x, y, b, b_row, masks, starts, reverse=reverse, store=True)
    return states, last


def _forward(plan: Plan, q, k, v, b, s0, masks):
    """``((o, final), states)``."""
    states, final = _states(plan, k, v, b, masks, s0, reverse=False)
    output = channel_kernels.channel_output if plan.decay == "channel" else forward.chunk_output
    return (output(plan, q, k, v, states, b, masks), final), states


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _chunked(plan: Plan, q, k, v, b, s0, masks):
    return _forward(plan, q, k, v, b, s0, masks)[0]


def _chunked_fwd(plan, q, k, v, b, s0, masks):
    out, states = _forward(plan, q, k, v, b, s0, masks)
    # the states go to the backward only where the plan keeps them (else it recomputes them)
    return out, (q, k, v, b, s0, masks, states if plan.save_states else None)


def _chunked_bwd(plan, residuals, cotangents):
    q, k, v, b, s0, masks, states = residuals
    do, dfinal = cotangents
    do = do.astype(q.dtype)
    if states is None:
        states, _ = _states(plan, k, v, b, masks, s0, reverse=False)
    dstates, ds0 = _states(plan, q, do, b, masks, dfinal.astype(F32), reverse=True)
    dq, dk, dv, db = backward.chunk_grads(plan, q, k, v, b, masks, do, states, dstates)
    return dq, dk, dv, db, (ds0 if s0 is not None else None), None


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


@reference.masks_nonfinite_if_poisoned
def linear_attention(
    q, k, v, g, *, scale, initial_state, runs, chunk_size=64, config: MosaicGpuConfig | None = None
):
    """``(o [B, T, Hv, V] in q's dtype, final_state [B, Hv, K, V] float32)``.

    q, k ``[B, T, Hqk, K]``; v ``[B, T, Hv, V]`` (``Hv`` a multiple of ``Hqk``); g None,
    ``[B, T, Hv]`` or ``[B, T, Hv, K]`` float32 log decays (<= 0); initial_state float32
    ``[B, Hv, K, V]`` or None; runs None or ``[B, T]`` int32 non-decreasing run indices
    (the state resets where it changes); ``config`` a ``tuning.MosaicGpuConfig`` (None:
    the table's). bf16 / fp16 inputs, ``chunk_size`` 64, key dims up to 128 (else
    NotImplementedError); differentiable in q, k, v, g and initial_state.
    """
    _, T, _, K = q.shape
    V = v.shape[3]
    plan = make_plan(
        q, v, g, initial_state, runs, scale=scale, chunk_size=chunk_size, config=config
    )
    Tp, Kp, Vp = plan.time, plan.key_dim, plan.value_dim
    q = _pad(q, {1: Tp, 3: Kp})
    k = _pad(k, {1: Tp, 3: Kp})
    v = _pad(v, {1: Tp, 3: Vp})
    b = None if g is None else chunk_cumsum(plan, g)
    masks = None if runs is None else run_masks(plan, runs)
    s0 = None if initial_state is None else _pad(initial_state.astype(F32), {2: Kp, 3: Vp})
    o, final = _chunked(plan, q, k, v, b, s0, masks)
    return o[:, :T, :, :V], final[:, :, :K, :V]


__all__ = ["linear_attention"]
