"""The delta rule's sequential passes over chunks: the states (forward) and their gradients.

Forward, for chunk ``c`` entered with ``S_c`` (``b`` the inclusive cumulative log decay in
the chunk, ``w``, ``u`` from the WY transform):

    v_new   = u - w S_c                                      (pseudo-values)
    S_{c+1} = [run_last = run_prev] exp(b_last) S_c + sum_s [run_s = run_last]
              exp(b_last - b_s) k_s v_new_s^T

i.e. the linear-attention state pass with ``v_new`` as values, which it computes on the way
(as flash-linear-attention's ``chunk_gated_delta_rule_fwd_h``). One program per (value
block, batch * v head) holds ``S [K, block]`` in registers (the whole key dimension: the
product ``w S`` sums over it) and writes ``S_c`` for every chunk and ``v_new``.

Backward, in reverse (``dS_n`` = d final_state):

    dv_new_c = scale * A_c^T do_c + (k exp(b_last - b) [run = run_last]) dS_{c+1}
    dS_c     = [run_last = run_prev] exp(b_last) dS_{c+1}
               + scale * (q exp(b) [run = run_prev])^T do_c - w_c^T dv_new_c

with ``A_ts = q_t . k_s exp(b_t - b_s)`` over causal pairs of one run. It writes
``dS_{c+1}`` for every chunk, ``dv_new`` and ``dS_0`` = d initial_state.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from seqmix.kernels.delta_rule.triton.plan import DeltaPlan
from seqmix.kernels.linear_attention.triton import chunk as tc

f32 = jnp.float32


def _decays(plan: DeltaPlan, g_ref, rows):
    """``(b [C], b_last, carry)`` of one chunk; (None, None, 1.0) without decay."""
    if plan.decay == "none":
        return None, None, 1.0
    b = jnp.cumsum(g_ref[rows].astype(f32), axis=0)
    bl = tc.last(b)
    return b, bl, jnp.exp(bl)


def _state_kernel(*refs, plan: DeltaPlan):
    it = iter(refs)
    k_ref, w_ref, u_ref = next(it), next(it), next(it)
    g_ref = next(it) if plan.decay != "none" else None
    r_ref = next(it) if plan.has_runs else None
    s0_ref = next(it) if plan.has_initial else None
    states_ref, vn_ref, end_ref = next(it), next(it), next(it)
    C = plan.chunk

    def body(c, S):
        states_ref[c] = S.astype(states_ref.dtype)
        start = pl.multiple_of(c * C, C)
        rows = pl.ds(start, C)
        v_new = u_ref[rows, :] - tc.dot(w_ref[rows, :], S, plan.wy_mma)
        vn_ref[rows, :] = v_new.astype(vn_ref.dtype)
        k = k_ref[rows, :]
        b, bl, carry = _decays(plan, g_ref, rows)
        S = carry * S
        keep = None
        if plan.has_runs:
            runs = tc.load_runs(r_ref, start, C, 1)
            keep = runs.keep_last(0)
            S = jnp.where(runs.carries(), S, 0.0)
        if b is not None:
            w = jnp.exp(bl - b)
            if keep is not None:
                w = jnp.where(keep, w, 0.0)
            kw = k.astype(f32) * w[:, None]
        else:
            kw = k if keep is None else jnp.where(keep[:, None], k, jnp.zeros_like(k))
        return S + tc.dot(kw, v_new, plan.mma, trans_a=True)

    BK, BV = end_ref.shape
    S = s0_ref[...].astype(f32) if s0_ref is not None else jnp.zeros((BK, BV), f32)
    end_ref[...] = lax.fori_loop(0, plan.chunks, body, S)


def _dstate_kernel(*refs, plan: DeltaPlan):
    it = iter(refs)
    q_ref, k_ref, w_ref, do_ref = next(it), next(it), next(it), next(it)
    g_ref = next(it) if plan.decay != "none" else None
    r_ref = next(it) if plan.has_runs else None
    dfinal_ref, dstates_ref, dvn_ref, dinit_ref = next(it), next(it), next(it), next(it)
    C, n = plan.chunk, plan.chunks
    t = lax.broadcasted_iota(jnp.int32, (C, C), 0)
    s = lax.broadcasted_iota(jnp.int32, (C, C), 1)

    def body(i, dS):
        c = n - 1 - i
        dstates_ref[c] = dS.astype(dstates_ref.dtype)
        start = pl.multiple_of(c * C, C)
        rows = pl.ds(start, C)
        q, k, do = q_ref[rows, :], k_ref[rows, :], do_ref[rows, :]
        b, bl, carry = _decays(plan, g_ref, rows)
        pair = t >= s
        keep_prev = keep_last = None
        if plan.has_runs:
            runs = tc.load_runs(r_ref, start, C, 1)
            pair = pair & runs.same(0, 0)
            keep_prev, keep_last = runs.keep_prev(0), runs.keep_last(0)
        A = tc.dot(q, k, plan.mma, trans_b=True)
        if b is not None:
            A = A * tc.masked_exp(pair, b[:, None] - b[None, :])
        else:
            A = jnp.where(pair, A, 0.0)
        dv = plan.scale * tc.dot_split(A, do, plan.mma, plan.split_scores, trans_a=True)
        kw = k.astype(f32)
        qs = q.astype(f32)
        if b is not None:
            kw = kw * jnp.exp(bl - b)[:, None]
            qs = qs * jnp.exp(b)[:, None]
        if keep_last is not None:
            kw = jnp.where(keep_last[:, None], kw, 0.0)
            qs = jnp.where(keep_prev[:, None], qs, 0.0)
        dv = dv + tc.dot(kw, dS, plan.state_mma)
        dvn_ref[rows, :] = dv.astype(dvn_ref.dtype)
        dS = carry * dS
        if plan.has_runs:
            dS = jnp.where(runs.carries(), dS, 0.0)
        dS = dS + plan.scale * tc.dot(qs, do, plan.mma, trans_a=True)
        return dS - tc.dot(w_ref[rows, :], dv, plan.wy_mma, trans_a=True)

    dinit_ref[...] = lax.fori_loop(0, n, body, dfinal_ref[...].astype(f32))


def _row(plan: DeltaPlan, width: int, qk: bool = False, value_block: bool = False):
    """Spec of a whole row ``[T, width]`` of a ``[B, T, H, D]`` array over the grid
    (value block, batch * v head): the q/k head (``qk``) or the v head; the value block
    ``vb`` of the last axis when ``value_block``."""
    T = plan.time

    def index(vb, bh):
        b, h, hq = plan.heads(bh)
        return (b, 0, hq if qk else h, vb if value_block else 0)

    return pl.BlockSpec((None, T, None, width), index)


def _token_specs(plan: DeltaPlan, g, runs):
    specs, args = [], []
    if g is not None:
        specs.append(
            pl.BlockSpec(
                (None, plan.time, None), lambda vb, bh: (plan.heads(bh)[0], 0, plan.heads(bh)[1])
            )
        )
        args.append(g)
    if runs is not None:
        specs.append(pl.BlockSpec((None, plan.time), lambda vb, bh: (plan.heads(bh)[0], 0)))
        args.append(runs)
    return specs, args


def _state_spec(plan: DeltaPlan, chunks: int | None):
    K, BV = plan.key_dim, plan.state_block_v
    if chunks is None:
        return pl.BlockSpec((None, None, K, BV), lambda vb, bh: plan.heads(bh)[:2] + (0, vb))
    return pl.BlockSpec((None, None, chunks, K, BV), lambda vb, bh: plan.heads(bh)[:2] + (0, 0, vb))


def chunk_states(plan: DeltaPlan, k, w, u, g, runs, initial_state, v_dtype):
    """``(states [B, Hv, n, K, V] in plan.state_dtype, v_new [B, T, Hv, V] in v_dtype,
    final [B, Hv, K, V] float32)`` from padded inputs and the WY factors."""
    B, T, Hv, K, V, n = (
        plan.batch,
        plan.time,
        plan.v_heads,
        plan.key_dim,
        plan.value_dim,
        plan.chunks,
    )
    BV = plan.state_block_v
    specs = [_row(plan, K, qk=True), _row(plan, K), _row(plan, BV, value_block=True)]
    args = [k, w, u]
    extra_specs, extra_args = _token_specs(plan, g, runs)
    specs += extra_specs
    args += extra_args
    if initial_state is not None:
        specs.append(_state_spec(plan, None))
        args.append(initial_state)
    return pl.pallas_call(
        functools.partial(_state_kernel, plan=plan),
        grid=(V // BV, B * Hv),
        in_specs=specs,
        out_specs=[_state_spec(plan, n), _row(plan, BV, value_block=True), _state_spec(plan, None)],
        out_shape=[
            jax.ShapeDtypeStruct((B, Hv, n, K, V), jnp.dtype(plan.state_dtype)),
            jax.ShapeDtypeStruct((B, T, Hv, V), v_dtype),
            jax.ShapeDtypeStruct((B, Hv, K, V), f32),
        ],
        compiler_params=plan.compiler_params("state"),
        interpret=plan.interpret,
        name="gated_delta_rule_chunk_states",
    )(*args)


def chunk_state_grads(plan: DeltaPlan, q, k, w, do, g, runs, dfinal):
    """``(dstates [B, Hv, n, K, V] in plan.state_dtype (dS_{c+1} per chunk), dv_new
    [B, T, Hv, V] float32, d initial_state [B, Hv, K, V] float32)``."""
    B, T, Hv, K, V, n = (
        plan.batch,
        plan.time,
        plan.v_heads,
        plan.key_dim,
        plan.value_dim,
        plan.chunks,
    )
    BV = plan.state_block_v
    specs = [
        _row(plan, K, qk=True),
        _row(plan, K, qk=True),
        _row(plan, K),
        _row(plan, BV, value_block=True),
    ]
    args = [q, k, w, do]
    extra_specs, extra_args = _token_specs(plan, g, runs)
    specs += extra_specs + [_state_spec(plan, None)]
    args += extra_args + [dfinal]
    return pl.pallas_call(
        functools.partial(_dstate_kernel, plan=plan),
        grid=(V // BV, B * Hv),
        in_specs=specs,
        out_specs=[_state_spec(plan, n), _row(plan, BV, value_block=True), _state_spec(plan, None)],
        out_shape=[
            jax.ShapeDtypeStruct((B, Hv, n, K, V), jnp.dtype(plan.state_dtype)),
            jax.ShapeDtypeStruct((B, T, Hv, V), f32),
            jax.ShapeDtypeStruct((B, Hv, K, V), f32),
        ],
        compiler_params=plan.compiler_params("dstate"),
        interpret=plan.interpret,
        name="gated_delta_rule_chunk_state_grads",
    )(*args)
