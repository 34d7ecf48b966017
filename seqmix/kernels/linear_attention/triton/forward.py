"""Stage 3 of the chunked form: every chunk's output, all chunks in parallel.

For a token ``t`` of chunk ``c`` (``b`` the inclusive cumulative log decay in the chunk):

    o_t = scale * ( [run_t = run_prev] (q_t * exp(b_t))^T S_c
                    + sum_{s <= t, run_s = run_t} (q_t . (k_s * exp(b_t - b_s))) v_s )

with ``S_c`` the state entering the chunk (``state.chunk_states``). One program per
(value block, chunk, batch * v head); the key dimension is summed in blocks inside. With the
two-level state pass the stored ``S_c`` is local to its segment and each key block of it is
completed in registers, ``S_c = local_c + f_c * seg_p`` (``chunk.completed``), before
its matmul: one more tile read (shared by the chunks of a segment, so mostly from L2) and
an FMA per element, no extra pass over the stored states.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from seqmix.kernels.linear_attention.triton import chunk as tc
from seqmix.kernels.linear_attention.triton.plan import Plan


def _output_kernel(*refs, plan: Plan):
    it = iter(refs)
    q_ref, k_ref, v_ref = next(it), next(it), next(it)
    g_ref = next(it) if plan.decay != "none" else None
    r_ref = next(it) if plan.has_runs else None
    s_ref = next(it)
    seg_ref, f_ref = (next(it), next(it)) if plan.segmented else (None, None)
    o_ref = next(it)
    L, n, BK = plan.sub_chunk, plan.subs, plan.block_k
    BV = o_ref.shape[-1]
    start = pl.multiple_of(pl.program_id(1) * plan.chunk, plan.chunk)
    runs = tc.chunk_runs(plan, r_ref, start)
    acc = [jnp.zeros((L, BV), jnp.float32) for _ in range(n)]

    def state_term(kb, qt, kt, bt, ends):
        del kt, ends
        S = s_ref[pl.ds(kb * BK, BK), :]
        if seg_ref is not None:
            S = tc.completed(
                S, seg_ref[pl.ds(kb * BK, BK), :], tc.chunk_factor(plan, f_ref, pl.ds(kb * BK, BK))
            )
        for i in range(n):
            qs = qt[i] if bt is None else qt[i].astype(jnp.float32) * jnp.exp(bt[i])
            acc[i] = acc[i] + tc.dot(qs, S, plan.state_mma)

    A, b = tc.attention_blocks(plan, q_ref, k_ref, g_ref, runs, per_block=state_term)
    write_output(plan, acc, A, b, runs, v_ref, o_ref)


def write_output(plan: Plan, acc, A, b, runs, v_ref, o_ref, offset=0, v_tiles=None):
    """Stores ``o`` of the chunk at rows ``offset ... offset + C``: ``scale * (mask_prev *
    exp(b) * acc + sum_j A[(i, j)] v_j)`` per sub-chunk ``i``, with ``acc[i] = (q_i [* exp
    b_i]) S_c`` (``[L, BV]`` float32) and ``A``, ``b`` from ``attention_blocks``; ``v_tiles``
    are the chunk's ``v_j`` when already loaded."""
    L, n = plan.sub_chunk, plan.subs
    for i in range(n):
        o = acc[i]
        if b is not None:  # scalar decay: the row factor exp(b_t) after the matmul
            o = o * jnp.exp(b)[:, None]
        if runs is not None:
            o = jnp.where(runs.keep_prev(i)[:, None], o, 0.0)
        for j in range(i + 1):
            vj = v_ref[pl.ds(offset + j * L, L), :] if v_tiles is None else v_tiles[j]
            o = o + tc.dot_split(A[(i, j)], vj, plan.mma, plan.split_scores)
        o_ref[pl.ds(offset + i * L, L), :] = (plan.scale * o).astype(o_ref.dtype)


def chunk_output(plan: Plan, q, k, v, g, runs, states, segments=None):
    """``o [B, T, Hv, V]`` in q's dtype from padded inputs and the chunk states;
    ``segments = (entering, factors, ...)`` of the two-level pass when ``plan.segmented``."""
    B, T, Hv, V = plan.batch, plan.time, plan.v_heads, plan.value_dim
    BV = plan.block_v
    sp = tc.ChunkSpecs(plan, "v", BV)
    specs, args = [sp.qk(), sp.qk(), sp.v()], [q, k, v]
    if g is not None:
        specs.append(sp.g(g.ndim))
        args.append(g)
    if runs is not None:
        specs.append(sp.runs())
        args.append(runs)
    specs.append(sp.state())
    args.append(states)
    if plan.segmented:
        specs += [sp.segment_state(), sp.factor()]
        args += list(segments[:2])
    return pl.pallas_call(
        functools.partial(_output_kernel, plan=plan),
        grid=(V // BV, plan.chunks, B * Hv),
        in_specs=specs,
        out_specs=sp.v(),
        out_shape=jax.ShapeDtypeStruct((B, T, Hv, V), q.dtype),
        compiler_params=plan.compiler_params("output"),
        interpret=plan.interpret,
        name="linear_attention_chunk_output",
    )(*args)
