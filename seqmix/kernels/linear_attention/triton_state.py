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
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from seqmix.kernels.linear_attention import triton_common as tc
from seqmix.kernels.linear_attention.triton_common import Plan


def _decays(plan: Plan, g_ref, rows):
    """``(b [C] or [C, BK], b_last, carry)`` of one chunk; (None, None, 1.0) without decay."""
    if plan.decay == "none":
        return None, None, 1.0
    b = jnp.cumsum(g_ref[rows].astype(jnp.float32), axis=0)
    bl = tc.last(b)
    carry = jnp.exp(bl) if plan.decay == "scalar" else jnp.exp(bl)[:, None]
    return b, bl, carry


def _state_kernel(*refs, plan: Plan):
    it = iter(refs)
    k_ref, v_ref = next(it), next(it)
    g_ref = next(it) if plan.decay != "none" else None
    r_ref = next(it) if plan.has_runs else None
    s0_ref = next(it) if plan.has_initial else None
    states_ref, final_ref = next(it), next(it)
    C = plan.chunk
    BK, BV = final_ref.shape

    def body(c, S):
        states_ref[c] = S.astype(states_ref.dtype)
        start = pl.multiple_of(c * C, C)
        rows = pl.ds(start, C)
        k = k_ref[rows, :]
        v = v_ref[rows, :]
        b, bl, carry = _decays(plan, g_ref, rows)
        keep = None
        S = carry * S
        if plan.has_runs:
            runs = tc.load_runs(r_ref, start, C, 1)
            keep = runs.keep_last(0)
            S = jnp.where(runs.carries(), S, 0.0)
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
        return S + tc.dot(kw, v, plan.mma, trans_a=True)

    S = s0_ref[...].astype(jnp.float32) if s0_ref is not None else jnp.zeros((BK, BV),
                                                                             jnp.float32)
    final_ref[...] = lax.fori_loop(0, plan.chunks, body, S)


def _dstate_kernel(*refs, plan: Plan):
    it = iter(refs)
    q_ref, do_ref = next(it), next(it)
    g_ref = next(it) if plan.decay != "none" else None
    r_ref = next(it) if plan.has_runs else None
    dfinal_ref, dstates_ref, dinit_ref = next(it), next(it), next(it)
    C, n = plan.chunk, plan.chunks

    def body(i, dS):
        c = n - 1 - i
        dstates_ref[c] = dS.astype(dstates_ref.dtype)
        start = pl.multiple_of(c * C, C)
        rows = pl.ds(start, C)
        q = q_ref[rows, :]
        do = do_ref[rows, :]
        b, _, carry = _decays(plan, g_ref, rows)
        keep = None
        dS = carry * dS
        if plan.has_runs:
            runs = tc.load_runs(r_ref, start, C, 1)
            keep = runs.keep_prev(0)
            dS = jnp.where(runs.carries(), dS, 0.0)
        if plan.decay == "scalar":
            u = jnp.exp(b)
            if keep is not None:
                u = jnp.where(keep, u, 0.0)
            update = tc.dot(q, do.astype(jnp.float32) * u[:, None], plan.mma, trans_a=True)
        else:
            qs = q.astype(jnp.float32) * jnp.exp(b) if plan.decay == "channel" else q
            if keep is not None:
                qs = jnp.where(keep[:, None], qs, jnp.zeros_like(qs))
            update = tc.dot(qs, do, plan.mma, trans_a=True)
        return dS + plan.scale * update

    dinit_ref[...] = lax.fori_loop(0, n, body, dfinal_ref[...].astype(jnp.float32))


def _specs(plan: Plan, BK: int, BV: int, first, second, g, runs):
    """In-specs for (first [B,T,*,K-like], second [B,T,Hv,V-like], g, runs) over the grid
    (key block, value block, batch * v head); ``first`` reads q/k heads."""
    T = plan.time

    def hq(kb, vb, bh):
        b, _, h = plan.heads(bh)
        return (b, 0, h, kb)

    def hv(kb, vb, bh):
        b, h, _ = plan.heads(bh)
        return (b, 0, h, vb)

    specs = [pl.BlockSpec((None, T, None, BK), hq), pl.BlockSpec((None, T, None, BV), hv)]
    args = [first, second]
    if g is not None:
        if g.ndim == 3:
            specs.append(pl.BlockSpec((None, T, None),
                                      lambda kb, vb, bh: (plan.heads(bh)[0], 0,
                                                          plan.heads(bh)[1])))
        else:
            specs.append(pl.BlockSpec((None, T, None, BK),
                                      lambda kb, vb, bh: (plan.heads(bh)[0], 0,
                                                          plan.heads(bh)[1], kb)))
        args.append(g)
    if runs is not None:
        specs.append(pl.BlockSpec((None, T), lambda kb, vb, bh: (plan.heads(bh)[0], 0)))
        args.append(runs)
    return specs, args


def _state_block_spec(plan: Plan, BK: int, BV: int, chunks: int | None):
    """Spec of a ``[B, Hv, (n,) K, V]`` float32/bf16 state array over the state grid."""
    if chunks is None:
        return pl.BlockSpec((None, None, BK, BV),
                            lambda kb, vb, bh: plan.heads(bh)[:2] + (kb, vb))
    return pl.BlockSpec((None, None, chunks, BK, BV),
                        lambda kb, vb, bh: plan.heads(bh)[:2] + (0, kb, vb))


def chunk_states(plan: Plan, k, v, g, runs, initial_state):
    """States entering every chunk ``[B, Hv, n, K, V]`` (``plan.state_dtype``) and the final
    state ``[B, Hv, K, V]`` float32. k ``[B, T, Hqk, K]``, v ``[B, T, Hv, V]`` (padded)."""
    B, Hv, K, V, n = plan.batch, plan.v_heads, plan.key_dim, plan.value_dim, plan.chunks
    BK, BV = plan.state_block_k, plan.state_block_v
    specs, args = _specs(plan, BK, BV, k, v, g, runs)
    if initial_state is not None:
        specs.append(_state_block_spec(plan, BK, BV, None))
        args.append(initial_state)
    return pl.pallas_call(
        functools.partial(_state_kernel, plan=plan),
        grid=(K // BK, V // BV, B * Hv),
        in_specs=specs,
        out_specs=[_state_block_spec(plan, BK, BV, n), _state_block_spec(plan, BK, BV, None)],
        out_shape=[jax.ShapeDtypeStruct((B, Hv, n, K, V), jnp.dtype(plan.state_dtype)),
                   jax.ShapeDtypeStruct((B, Hv, K, V), jnp.float32)],
        compiler_params=plan.compiler_params("state"),
        interpret=plan.interpret,
        name="linear_attention_chunk_states",
    )(*args)


def chunk_state_grads(plan: Plan, q, do, g, runs, dfinal):
    """``dS_{c+1}`` for every chunk ``[B, Hv, n, K, V]`` (``plan.state_dtype``) and
    ``dS_0 = d initial_state`` float32. q ``[B, T, Hqk, K]``, do ``[B, T, Hv, V]``."""
    B, Hv, K, V, n = plan.batch, plan.v_heads, plan.key_dim, plan.value_dim, plan.chunks
    BK, BV = plan.state_block_k, plan.state_block_v
    specs, args = _specs(plan, BK, BV, q, do, g, runs)
    specs.append(_state_block_spec(plan, BK, BV, None))
    args.append(dfinal)
    return pl.pallas_call(
        functools.partial(_dstate_kernel, plan=plan),
        grid=(K // BK, V // BV, B * Hv),
        in_specs=specs,
        out_specs=[_state_block_spec(plan, BK, BV, n), _state_block_spec(plan, BK, BV, None)],
        out_shape=[jax.ShapeDtypeStruct((B, Hv, n, K, V), jnp.dtype(plan.state_dtype)),
                   jax.ShapeDtypeStruct((B, Hv, K, V), jnp.float32)],
        compiler_params=plan.compiler_params("dstate"),
        interpret=plan.interpret,
        name="linear_attention_chunk_state_grads",
    )(*args)
