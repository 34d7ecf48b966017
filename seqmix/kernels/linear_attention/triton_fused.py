"""Fused forward (opt-in, ``config={"fused_forward": True}``): the state pass and every
chunk's output in one kernel, so that the chunk states never go through HBM.

One program per (value block, [segment,] batch * v head) walks its chunks in order with the
state ``S [K, BV]`` in registers (float32, ``K / block_k`` tiles). For chunk ``c`` with ``b``
the inclusive cumulative log decay inside it:

    o_t     = scale * ( [run_t = run_prev] (q_t * exp(b_t))^T S_c
                        + sum_{s <= t, run_s = run_t} (q_t . (k_s * exp(b_t - b_s))) v_s )
    S_{c+1} = [run_last = run_prev] exp(b_last) * S_c
              + sum_s [run_s = run_last] (k_s * exp(b_last - b_s)) v_s^T

(the formulas of ``triton_output`` and ``triton_state``; per-channel ``exp`` factors are
``[K]`` vectors). HBM traffic per token and head is q, k, v read and o written (1 KB at
D = 128 in bf16) instead of 2.5 KB with stored bf16 states; the price is one dependent chain
per program that carries all four matmuls of a chunk, and the intra-chunk scores ``q k^T``
computed once per value block. With the two-level pass (``plan.segmented``),
``triton_state.chunk_states(store_states=False)`` first walks the segments for their local
end states (reading k and v once more, 0.5 KB per token and head), ``combine_segments`` gives
the true state entering every segment, and the fused program of segment ``p`` starts there.

Only the forward is fused: the backward recomputes and stores the chunk states as before.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from seqmix.kernels.linear_attention import triton_common as tc
from seqmix.kernels.linear_attention.triton_common import Plan
from seqmix.kernels.linear_attention.triton_output import write_output

f32 = jnp.float32


def _fused_kernel(*refs, plan: Plan):
    it = iter(refs)
    q_ref, k_ref, v_ref = next(it), next(it), next(it)
    g_ref = next(it) if plan.decay != "none" else None
    r_ref = next(it) if plan.has_runs else None
    s0_ref = next(it) if plan.has_initial or plan.segmented else None
    o_ref = next(it)
    final_ref = next(it) if not plan.segmented else None
    C, L, n, BK = plan.chunk, plan.sub_chunk, plan.subs, plan.block_k
    BV = o_ref.shape[-1]
    nk = plan.key_dim // BK
    if plan.segmented:  # program ids outside loops (interpret mode resolves them only there)
        first = pl.program_id(1) * plan.segment_chunks
        count = jnp.minimum(plan.segment_chunks, plan.chunks - first)
    else:
        first, count = 0, plan.chunks

    def body(i, states):
        c = first + i if plan.segmented else i
        start = pl.multiple_of(c * C, C)
        runs = tc.chunk_runs(plan, r_ref, start)
        v_tiles = [v_ref[pl.ds(start + j * L, L), :] for j in range(n)]
        b = bl = None
        if plan.decay == "scalar":
            b = tc.scalar_decay(g_ref, pl.ds(start, C))
            bl = tc.last(b)
        acc = [jnp.zeros((L, BV), f32) for _ in range(n)]
        new = [None] * nk

        def per_block(kb, qt, kt, bt, ends):
            S = states[kb]
            for t in range(n):  # output: the state term with the state entering the chunk
                qs = qt[t] if bt is None else qt[t].astype(f32) * jnp.exp(bt[t])
                acc[t] = acc[t] + tc.dot(qs, S, plan.state_mma)
            if plan.decay == "scalar":  # state leaving the chunk
                carry = jnp.exp(bl)
                kw = [kt[0].astype(f32) * jnp.exp(bl - b)[:, None]]
            elif plan.decay == "channel":
                carry = jnp.exp(ends[-1])[:, None]
                kw = [kt[j].astype(f32) * jnp.exp(ends[-1][None, :] - bt[j]) for j in range(n)]
            else:
                carry, kw = None, list(kt)
            if runs is not None:
                kw = [
                    jnp.where(runs.keep_last(j)[:, None], kw[j], jnp.zeros_like(kw[j]))
                    for j in range(n)
                ]
            if carry is not None:
                S = carry * S
            if runs is not None:
                S = jnp.where(runs.carries(), S, 0.0)
            for j in range(n):
                S = S + tc.dot(kw[j], v_tiles[j], plan.mma, trans_a=True)
            new[kb] = S

        A, b_scores = tc.attention_blocks(
            plan, q_ref, k_ref, g_ref, runs, per_block=per_block, offset=start
        )
        write_output(plan, acc, A, b_scores, runs, v_ref, o_ref, offset=start, v_tiles=v_tiles)
        return tuple(new)

    if s0_ref is not None:
        states = tuple(s0_ref[pl.ds(kb * BK, BK), :].astype(f32) for kb in range(nk))
    else:
        states = tuple(jnp.zeros((BK, BV), f32) for _ in range(nk))
    states = lax.fori_loop(0, count, body, states)
    if final_ref is not None:
        for kb in range(nk):
            final_ref[pl.ds(kb * BK, BK), :] = states[kb]


def fused_output(plan: Plan, q, k, v, g, runs, state_in):
    """``(o [B, T, Hv, V] in q's dtype, final state [B, Hv, K, V] float32 or None)``.

    Padded inputs. ``state_in``: without segments the initial state ``[B, Hv, K, V]`` (or
    None) and the final state is returned; with ``plan.segmented`` the state entering every
    segment ``[B, Hv, P, K, V]`` (``combine_segments``) and the final state is None (the
    combine has it).
    """
    B, T, Hv, K, V = plan.batch, plan.time, plan.v_heads, plan.key_dim, plan.value_dim
    BV = plan.block_v
    seg = plan.segmented

    def at(fn):  # index maps over (value block, [segment,] batch * v head)
        return lambda vb, *rest: fn(vb, rest[0] if seg else 0, *plan.heads(rest[-1]))

    specs = [
        pl.BlockSpec((None, T, None, K), at(lambda vb, p, b, h, hq: (b, 0, hq, 0))),
        pl.BlockSpec((None, T, None, K), at(lambda vb, p, b, h, hq: (b, 0, hq, 0))),
        pl.BlockSpec((None, T, None, BV), at(lambda vb, p, b, h, hq: (b, 0, h, vb))),
    ]
    args = [q, k, v]
    if g is not None:
        if g.ndim == 3:
            specs.append(pl.BlockSpec((None, T, None), at(lambda vb, p, b, h, hq: (b, 0, h))))
        else:
            specs.append(pl.BlockSpec((None, T, None, K), at(lambda vb, p, b, h, hq: (b, 0, h, 0))))
        args.append(g)
    if runs is not None:
        specs.append(pl.BlockSpec((None, T), at(lambda vb, p, b, h, hq: (b, 0))))
        args.append(runs)
    state_spec = pl.BlockSpec((None, None, K, BV), at(lambda vb, p, b, h, hq: (b, h, 0, vb)))
    if seg:
        specs.append(
            pl.BlockSpec((None, None, None, K, BV), at(lambda vb, p, b, h, hq: (b, h, p, 0, vb)))
        )
        args.append(state_in)
    elif state_in is not None:
        specs.append(state_spec)
        args.append(state_in)
    o_spec = pl.BlockSpec((None, T, None, BV), at(lambda vb, p, b, h, hq: (b, 0, h, vb)))
    out_specs = [o_spec]
    out_shape = [jax.ShapeDtypeStruct((B, T, Hv, V), q.dtype)]
    if not seg:
        out_specs.append(state_spec)
        out_shape.append(jax.ShapeDtypeStruct((B, Hv, K, V), f32))
    grid = (V // BV, plan.segments, B * Hv) if seg else (V // BV, B * Hv)
    out = pl.pallas_call(
        functools.partial(_fused_kernel, plan=plan),
        grid=grid,
        in_specs=specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=plan.compiler_params("fused"),
        interpret=plan.interpret,
        name="linear_attention_fused_forward",
    )(*args)
    return out[0], (None if seg else out[1])
