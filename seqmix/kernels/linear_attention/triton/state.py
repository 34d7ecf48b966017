"""Sequential passes over chunks: the chunk states (forward) and their gradients (backward).

Forward (stages 1 and 2 of the chunked form, fused): for every chunk ``c`` with ``b`` the
inclusive cumulative log decay inside it,

    h_c     = sum_s [run_s = run_last] exp(b_last - b_s) k_s v_s^T
    S_{c+1} = [run_last = run_prev] exp(b_last) * S_c + h_c

one program per (batch, v head, key block, value block) walks the chunks in order with
``S`` in registers and writes ``S_c``, the state entering every chunk; the last ``S`` is the
final state (float32).

Backward: the reverse pass for ``dS_c``, the gradient of the state entering chunk ``c``:

    dS_c = [run_last = run_prev] exp(b_last) * dS_{c+1}
           + scale * sum_t [run_t = run_prev] (q_t exp(b_t)) do_t^T,

with ``dS_{n} = d final_state``; it writes ``dS_{c+1}`` (the gradient of the state leaving
chunk ``c``) for every chunk and ``dS_0 = d initial_state``. Per-channel decays scale the
rows of the state (``exp(b)`` is a ``[K]`` vector).

Two-level passes (``plan.segmented``, see ``ops.py``): the grid gains a segment axis
(key block, value block, segment, batch * v head); each program walks only its segment's
chunks from a zero state (zero gradient at the segment end), stores local states and the
per-chunk factors, and ``combine_segments`` carries the true states (gradients) across the
``P`` segments; the per-chunk kernels complete the local ones (``chunk``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from seqmix.kernels.linear_attention.triton import chunk as tc
from seqmix.kernels.linear_attention.triton.plan import Plan


def _decays(plan: Plan, g_ref, rows):
    """``(b [C] or [C, BK], b_last, carry)`` of one chunk; (None, None, 1.0) without decay."""
    if plan.decay == "none":
        return None, None, 1.0
    b = jnp.cumsum(g_ref[rows].astype(jnp.float32), axis=0)
    bl = tc.last(b)
    carry = jnp.exp(bl) if plan.decay == "scalar" else jnp.exp(bl)[:, None]
    return b, bl, carry


def _top_decay(b):
    """The largest of a chunk's cumulative log decays (its first row's), floored so that a
    chunk decayed to zero throughout (``-inf``) gives weights ``exp(-inf - top) = 0``."""
    return jnp.maximum(jnp.max(b, axis=0), -1e30)


def _segment(plan: Plan):
    """``(first chunk, number of chunks)`` this program walks: its segment (grid axis 2) in
    the two-level pass, every chunk otherwise."""
    if not plan.segmented:
        return 0, plan.chunks
    first = pl.program_id(2) * plan.segment_chunks
    return first, jnp.minimum(plan.segment_chunks, plan.chunks - first)


def _writes_factors(plan: Plan):
    """Whether this program stores the per-chunk factors: they depend on the key block only
    (per channel) or on nothing (scalar), so one program per key block (or per head) does."""
    lead = pl.program_id(1) == 0
    return lead if plan.decay == "channel" else lead & (pl.program_id(0) == 0)


def _effective_carry(plan: Plan, bl, runs):
    """The factor of the state entering a chunk in the state leaving it: ``exp(b_last)``
    (0-d, or ``[BK]`` per channel; 1 without decay), 0 where the run changes."""
    f = jnp.ones((), jnp.float32) if bl is None else jnp.exp(bl)
    if runs is not None:
        f = jnp.where(runs.carries(), f, 0.0)
    return f


def _state_kernel(*refs, plan: Plan):
    it = iter(refs)
    k_ref, v_ref = next(it), next(it)
    g_ref = next(it) if plan.decay != "none" else None
    r_ref = next(it) if plan.has_runs else None
    s0_ref = next(it) if plan.has_initial and not plan.segmented else None
    states_ref = next(it)
    end_ref = next(it)
    f_ref = next(it) if plan.segmented else None
    a_ref = next(it) if plan.segmented else None
    C = plan.chunk
    BK, BV = end_ref.shape
    first, count = _segment(plan)
    # program ids are read here: interpret mode resolves them only outside loops and branches
    lead = _writes_factors(plan) if plan.segmented else None
    segment = pl.program_id(2) if plan.segmented else None

    def body(i, carry_in):
        S, F = carry_in if plan.segmented else (carry_in, None)
        c = first + i if plan.segmented else i
        if states_ref is not None:
            states_ref[c] = S.astype(states_ref.dtype)
        if f_ref is not None:

            @pl.when(lead)
            def _():
                f_ref[c] = F

        start = pl.multiple_of(c * C, C)
        rows = pl.ds(start, C)
        k = k_ref[rows, :]
        v = v_ref[rows, :]
        b, bl, carry = _decays(plan, g_ref, rows)
        keep = runs = None
        S = carry * S
        if plan.has_runs:
            runs = tc.load_runs(r_ref, start, C, 1)
            keep = runs.keep_last(0)
            S = jnp.where(runs.carries(), S, 0.0)
        if plan.segmented:
            F = _effective_carry(plan, bl, runs) * F
        if plan.decay == "scalar":
            w = jnp.exp(bl - b)
            if keep is not None:
                w = jnp.where(keep, w, 0.0)
            kw = k.astype(jnp.float32) * w[:, None]
        elif plan.decay == "channel":
            kw = k.astype(jnp.float32) * jnp.exp(bl[None, :] - b)
            if keep is not None:
                kw = jnp.where(keep[:, None], kw, 0.0)
        else:
            kw = k if keep is None else jnp.where(keep[:, None], k, jnp.zeros_like(k))
        S = S + tc.dot(kw, v, plan.mma, trans_a=True)
        return (S, F) if plan.segmented else S

    S = s0_ref[...].astype(jnp.float32) if s0_ref is not None else jnp.zeros((BK, BV), jnp.float32)
    if not plan.segmented:
        end_ref[...] = lax.fori_loop(0, count, body, S)
        return
    F = jnp.ones((BK,) if plan.decay == "channel" else (), jnp.float32)
    S, F = lax.fori_loop(0, count, body, (S, F))
    end_ref[...] = S
    if a_ref is not None:

        @pl.when(lead)
        def _():
            a_ref[segment] = F


def _dstate_kernel(*refs, plan: Plan):
    it = iter(refs)
    q_ref, do_ref = next(it), next(it)
    g_ref = next(it) if plan.decay != "none" else None
    r_ref = next(it) if plan.has_runs else None
    dfinal_ref = next(it) if not plan.segmented else None
    dstates_ref, dinit_ref = next(it), next(it)
    f_ref = next(it) if plan.segmented else None
    C = plan.chunk
    BK, BV = dinit_ref.shape
    first, count = _segment(plan)
    # program ids are read here: interpret mode resolves them only outside loops and branches
    lead = _writes_factors(plan) if plan.segmented else None

    def body(i, carry_in):
        dS, F = carry_in if plan.segmented else (carry_in, None)
        c = first + count - 1 - i
        dstates_ref[c] = dS.astype(dstates_ref.dtype)
        if f_ref is not None:

            @pl.when(lead)
            def _():
                f_ref[c] = F

        start = pl.multiple_of(c * C, C)
        rows = pl.ds(start, C)
        q = q_ref[rows, :]
        do = do_ref[rows, :]
        b, bl, carry = _decays(plan, g_ref, rows)
        keep = runs = None
        dS = carry * dS
        if plan.has_runs:
            runs = tc.load_runs(r_ref, start, C, 1)
            keep = runs.keep_prev(0)
            dS = jnp.where(runs.carries(), dS, 0.0)
        if f_ref is not None:
            F = _effective_carry(plan, bl, runs) * F
        # The decays to the chunk's start enter the matmul relative to the largest (its
        # first row's), which is applied to the float32 result: a half-precision operand
        # would flush weights under ~6e-8 to zero, and with them d initial_state after a
        # strong first decay.
        if plan.decay == "scalar":
            top = _top_decay(b)
            u = jnp.exp(b - top)
            if keep is not None:
                u = jnp.where(keep, u, 0.0)
            update = jnp.exp(top) * tc.dot(
                q, do.astype(jnp.float32) * u[:, None], plan.mma, trans_a=True
            )
        elif plan.decay == "channel":
            top = _top_decay(b)
            qs = q.astype(jnp.float32) * jnp.exp(b - top[None, :])
            if keep is not None:
                qs = jnp.where(keep[:, None], qs, jnp.zeros_like(qs))
            update = jnp.exp(top)[:, None] * tc.dot(qs, do, plan.mma, trans_a=True)
        else:
            qs = q if keep is None else jnp.where(keep[:, None], q, jnp.zeros_like(q))
            update = tc.dot(qs, do, plan.mma, trans_a=True)
        dS = dS + plan.scale * update
        return (dS, F) if plan.segmented else dS

    dS = (
        dfinal_ref[...].astype(jnp.float32)
        if dfinal_ref is not None
        else jnp.zeros((BK, BV), jnp.float32)
    )
    if not plan.segmented:
        dinit_ref[...] = lax.fori_loop(0, count, body, dS)
        return
    F = jnp.ones((BK,) if plan.decay == "channel" else (), jnp.float32)
    dinit_ref[...] = lax.fori_loop(0, count, body, (dS, F))[0]


def _combine_kernel(*refs, plan: Plan, reverse: bool):
    it = iter(refs)
    a_ref, local_ref = next(it), next(it)
    init_ref = next(it) if len(refs) == 5 else None
    seg_ref, last_ref = next(it), next(it)
    P = plan.segments

    def body(i, S):
        p = P - 1 - i if reverse else i
        seg_ref[p] = S.astype(seg_ref.dtype)
        a = a_ref[p]
        if plan.decay == "channel":
            a = a[:, None]
        return a * S + local_ref[p]

    S = (
        init_ref[...].astype(jnp.float32)
        if init_ref is not None
        else jnp.zeros(last_ref.shape, jnp.float32)
    )
    last_ref[...] = lax.fori_loop(0, P, body, S)


def _specs(plan: Plan, BK: int, BV: int, first, second, g, runs):
    """In-specs for (first [B,T,*,K-like], second [B,T,Hv,V-like], g, runs) over the grid
    (key block, value block, [segment,] batch * v head); ``first`` reads q/k heads."""
    T = plan.time

    def hq(kb, vb, *rest):
        b, _, h = plan.heads(rest[-1])
        return (b, 0, h, kb)

    def hv(kb, vb, *rest):
        b, h, _ = plan.heads(rest[-1])
        return (b, 0, h, vb)

    specs = [pl.BlockSpec((None, T, None, BK), hq), pl.BlockSpec((None, T, None, BV), hv)]
    args = [first, second]
    if g is not None:
        if g.ndim == 3:
            specs.append(
                pl.BlockSpec(
                    (None, T, None),
                    lambda kb, vb, *rest: (plan.heads(rest[-1])[0], 0, plan.heads(rest[-1])[1]),
                )
            )
        else:
            specs.append(
                pl.BlockSpec(
                    (None, T, None, BK),
                    lambda kb, vb, *rest: (plan.heads(rest[-1])[0], 0, plan.heads(rest[-1])[1], kb),
                )
            )
        args.append(g)
    if runs is not None:
        specs.append(pl.BlockSpec((None, T), lambda kb, vb, *rest: (plan.heads(rest[-1])[0], 0)))
        args.append(runs)
    return specs, args


def _state_block_spec(plan: Plan, BK: int, BV: int, chunks: int | None):
    """Spec of a ``[B, Hv, (n,) K, V]`` float32/bf16 state array over the state grid."""
    if chunks is None:
        return pl.BlockSpec(
            (None, None, BK, BV), lambda kb, vb, *rest: plan.heads(rest[-1])[:2] + (kb, vb)
        )
    return pl.BlockSpec(
        (None, None, chunks, BK, BV), lambda kb, vb, *rest: plan.heads(rest[-1])[:2] + (0, kb, vb)
    )


def _segment_specs(plan: Plan, BK: int, BV: int):
    """Specs over the segmented grid (key block, value block, segment, batch * v head) of
    the per-segment state ``[B, Hv, P, K, V]`` (this segment's block), the per-chunk factors
    ``[B, Hv, n(, K)]`` and the per-segment decays ``[B, Hv, P(, K)]`` (whole rows)."""
    n, P = plan.chunks, plan.segments
    seg = pl.BlockSpec(
        (None, None, None, BK, BV), lambda kb, vb, p, bh: plan.heads(bh)[:2] + (p, kb, vb)
    )
    if plan.decay == "channel":
        factors = pl.BlockSpec(
            (None, None, n, BK), lambda kb, vb, p, bh: plan.heads(bh)[:2] + (0, kb)
        )
        decays = pl.BlockSpec(
            (None, None, P, BK), lambda kb, vb, p, bh: plan.heads(bh)[:2] + (0, kb)
        )
    else:
        factors = pl.BlockSpec((None, None, n), lambda kb, vb, p, bh: plan.heads(bh)[:2] + (0,))
        decays = pl.BlockSpec((None, None, P), lambda kb, vb, p, bh: plan.heads(bh)[:2] + (0,))
    return seg, factors, decays


def _factor_shapes(plan: Plan):
    """Shapes of the per-chunk factors and per-segment decays of the two-level pass."""
    B, Hv, K, n, P = plan.batch, plan.v_heads, plan.key_dim, plan.chunks, plan.segments
    extra = (K,) if plan.decay == "channel" else ()
    return (
        jax.ShapeDtypeStruct((B, Hv, n) + extra, jnp.float32),
        jax.ShapeDtypeStruct((B, Hv, P) + extra, jnp.float32),
    )


def _grid(plan: Plan, BK: int, BV: int):
    K, V, BH = plan.key_dim, plan.value_dim, plan.batch * plan.v_heads
    if plan.segmented:
        return (K // BK, V // BV, plan.segments, BH)
    return (K // BK, V // BV, BH)


def chunk_states(plan: Plan, k, v, g, runs, initial_state):
    """``(states, final, segments)``: the states entering every chunk ``[B, Hv, n, K, V]``
    (``plan.state_dtype``), the final state ``[B, Hv, K, V]`` float32, and None.

    k ``[B, T, Hqk, K]``, v ``[B, T, Hv, V]`` (padded). With the two-level pass
    (``plan.segmented``) ``states`` are local to their segment (walked from zero at its
    start) and ``segments = (entering, factors, decays)``: the true state entering every
    segment ``[B, Hv, P, K, V]`` (``plan.state_dtype``), the factor of every chunk (decay
    from its segment's
    start, ``[B, Hv, n(, K)]``) and every segment's total decay ``[B, Hv, P(, K)]``; the
    state entering chunk ``c`` is ``states[c] + factors[c] * entering[c // segment_chunks]``.
    """
    B, Hv, K, V, n = plan.batch, plan.v_heads, plan.key_dim, plan.value_dim, plan.chunks
    BK, BV = plan.state_block_k, plan.state_block_v
    specs, args = _specs(plan, BK, BV, k, v, g, runs)
    if initial_state is not None and not plan.segmented:
        specs.append(_state_block_spec(plan, BK, BV, None))
        args.append(initial_state)
    out_specs, out_shape = [], []
    out_specs.append(_state_block_spec(plan, BK, BV, n))
    out_shape.append(jax.ShapeDtypeStruct((B, Hv, n, K, V), jnp.dtype(plan.state_dtype)))
    if plan.segmented:
        seg, factors, decays = _segment_specs(plan, BK, BV)
        factor_shape, decay_shape = _factor_shapes(plan)
        out_specs += [seg, factors, decays]
        out_shape += (
            [jax.ShapeDtypeStruct((B, Hv, plan.segments, K, V), jnp.float32)]
            + [factor_shape]
            + [decay_shape]
        )
    else:
        out_specs.append(_state_block_spec(plan, BK, BV, None))
        out_shape.append(jax.ShapeDtypeStruct((B, Hv, K, V), jnp.float32))
    out = pl.pallas_call(
        functools.partial(_state_kernel, plan=plan),
        grid=_grid(plan, BK, BV),
        in_specs=specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=plan.compiler_params("state"),
        interpret=plan.interpret,
        name="linear_attention_chunk_states",
    )(*args)
    if not plan.segmented:
        return out[0], out[1], None
    states, ends, factors, decays = out
    entering, final = combine_segments(plan, decays, ends, initial_state, reverse=False)
    return states, final, (entering, factors, decays)


def chunk_state_grads(plan: Plan, q, do, g, runs, dfinal, decays=None):
    """``(dstates, dinit, segments)``: ``dS_{c+1}`` for every chunk ``[B, Hv, n, K, V]``
    (``plan.state_dtype``), ``dS_0 = d initial_state`` float32, and None.

    q ``[B, T, Hqk, K]``, do ``[B, T, Hv, V]``. With the two-level pass ``decays`` are the
    segment decays of ``chunk_states``, ``dstates`` are local to their segment (zero at its
    end) and ``segments = (leaving, factors)``: the true gradient of the state leaving every
    segment ``[B, Hv, P, K, V]`` (``plan.state_dtype``) and every chunk's factor (decay from
    its end to its segment's end, ``[B, Hv, n(, K)]``); ``dS_{c+1} = dstates[c] + factors[c] *
    leaving[c // segment_chunks]``.
    """
    B, Hv, K, V, n = plan.batch, plan.v_heads, plan.key_dim, plan.value_dim, plan.chunks
    BK, BV = plan.state_block_k, plan.state_block_v
    specs, args = _specs(plan, BK, BV, q, do, g, runs)
    out_specs = [_state_block_spec(plan, BK, BV, n)]
    out_shape = [jax.ShapeDtypeStruct((B, Hv, n, K, V), jnp.dtype(plan.state_dtype))]
    if plan.segmented:
        seg, factors, _ = _segment_specs(plan, BK, BV)
        out_specs += [seg, factors]
        out_shape += [
            jax.ShapeDtypeStruct((B, Hv, plan.segments, K, V), jnp.float32),
            _factor_shapes(plan)[0],
        ]
    else:
        specs.append(_state_block_spec(plan, BK, BV, None))
        args.append(dfinal)
        out_specs.append(_state_block_spec(plan, BK, BV, None))
        out_shape.append(jax.ShapeDtypeStruct((B, Hv, K, V), jnp.float32))
    out = pl.pallas_call(
        functools.partial(_dstate_kernel, plan=plan),
        grid=_grid(plan, BK, BV),
        in_specs=specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=plan.compiler_params("dstate"),
        interpret=plan.interpret,
        name="linear_attention_chunk_state_grads",
    )(*args)
    if not plan.segmented:
        return out[0], out[1], None
    dstates, starts, factors = out
    leaving, dinit = combine_segments(plan, decays, starts, dfinal, reverse=True)
    return dstates, dinit, (leaving, factors)


def combine_segments(plan: Plan, decays, local, init, *, reverse: bool):
    """The short sequential pass over segments of the two-level scheme.

    Forward (``reverse=False``): ``entering_0 = init`` (zero if None), ``entering_{p+1} =
    a_p * entering_p + local_p`` with ``local_p`` the state a segment leaves from a zero
    start and ``a_p`` its decay (``decays``, 0-d or per key channel, 0 across a run change);
    returns ``(entering [B, Hv, P, K, V], final)``. Backward (``reverse=True``): ``leaving_{P-1}
    = init`` (d final state), ``leaving_{p-1} = a_p * leaving_p + local_p`` with ``local_p``
    the gradient of the state entering segment ``p`` from a zero end; returns ``(leaving,
    d initial_state)``. The pass runs in float32; ``entering`` / ``leaving`` are stored in
    ``plan.state_dtype`` like the chunk states (bf16 for bf16 inputs: they are read by every
    chunk of their segment, so this halves the extra tile traffic of the completions), the
    last value in float32.
    """
    B, Hv, K, V, P = plan.batch, plan.v_heads, plan.key_dim, plan.value_dim, plan.segments
    BK, BV = plan.state_block_k, plan.state_block_v
    seg = pl.BlockSpec((None, None, P, BK, BV), lambda kb, vb, bh: plan.heads(bh)[:2] + (0, kb, vb))
    if plan.decay == "channel":
        dspec = pl.BlockSpec((None, None, P, BK), lambda kb, vb, bh: plan.heads(bh)[:2] + (0, kb))
    else:
        dspec = pl.BlockSpec((None, None, P), lambda kb, vb, bh: plan.heads(bh)[:2] + (0,))
    specs, args = [dspec, seg], [decays, local]
    if init is not None:
        specs.append(_state_block_spec(plan, BK, BV, None))
        args.append(init.astype(jnp.float32))
    return pl.pallas_call(
        functools.partial(_combine_kernel, plan=plan, reverse=reverse),
        grid=(K // BK, V // BV, B * Hv),
        in_specs=specs,
        out_specs=[seg, _state_block_spec(plan, BK, BV, None)],
        out_shape=[
            jax.ShapeDtypeStruct((B, Hv, P, K, V), jnp.dtype(plan.state_dtype)),
            jax.ShapeDtypeStruct((B, Hv, K, V), jnp.float32),
        ],
        compiler_params=plan.compiler_params("state"),
        interpret=plan.interpret,
        name="linear_attention_combine_segments",
    )(*args)
