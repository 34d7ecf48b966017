"""Per-chunk kernels for per-channel decays: output, dv, and dq / dk / d b.

The formulas are those of ``forward.py`` and ``backward.py`` with the decay factors per
key channel: ``u_t = exp(b_t) [run_t = run_prev]`` and ``w_s = exp(b_last - b_s) [run_s =
run_last]`` are ``[C, K]`` and scale q / k (or the ``[C, K]`` state products) elementwise,
and the intra-chunk terms come from ``channel.py``'s sub-chunk decomposition. One program
per (chunk, batch * v head): the chunk's q, k and b are loaded once into padded SMEM, the
intra-chunk scores (or their gradient) are computed once, and the value dimension is
walked in blocks of ``block_v_grad`` through a TMA pipeline. Staging buffers live in
scopes of their own so that the phases share shared memory.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from seqmix.kernels.linear_attention.mosaic_gpu import channel as ch
from seqmix.kernels.linear_attention.mosaic_gpu import common as cm
from seqmix.kernels.linear_attention.mosaic_gpu.plan import Plan

F32 = jnp.float32


def _load_chunk(plan: Plan, q_ref, k_ref, b_ref, m_ref, s, bi, h, hq, t):
    """Issues and awaits the chunk's copies into padded SMEM; returns a ``channel.Chunk``."""
    C = plan.chunk
    plgpu.copy_gmem_to_smem(q_ref.at[bi, t, hq], ch.interior(s["qp"], C), s["chunk_bar"])
    plgpu.copy_gmem_to_smem(k_ref.at[bi, t, hq], ch.interior(s["kp"], C), s["chunk_bar"])
    plgpu.copy_gmem_to_smem(b_ref.at[bi, t, h], ch.interior(s["bp"], C), s["chunk_bar"])
    if m_ref is not None:
        plgpu.copy_gmem_to_smem(m_ref.at[bi, :, t], s["m"], s["chunk_bar"])
        plgpu.copy_gmem_to_smem(m_ref.at[bi, 2, t], ch.vector_interior(s["rp"], C), s["chunk_bar"])
    plgpu.barrier_wait(s["chunk_bar"])
    return ch.Chunk(plan, s["qp"], s["kp"], s["bp"], s["rp"] if m_ref is not None else None)


def _chunk_scratch(plan: Plan, *, both: bool) -> dict:
    C, K = plan.chunk, plan.key_dim
    dtype = jnp.dtype(plan.dtype)
    scratch = {
        "qp": ch.padded(C, K, dtype, both=both),
        "kp": ch.padded(C, K, dtype, both=both),
        "bp": ch.padded(C, K, F32, both=both),
        "chunk_bar": plgpu.Barrier(num_arrivals=3 + 2 * int(plan.has_runs)),
    }
    if plan.has_runs:
        scratch["m"] = cm.vector((3, C))
        scratch["rp"] = ch.padded_vector(C)
    return scratch


def _causal_same_run(plan: Plan, s, m_ref):
    C = plan.chunk
    r, c = cm.iota((C, C), 0), cm.iota((C, C), 1)
    mask = r >= c
    if m_ref is not None:
        run_r = plgpu.load(s["m"].at[2], layout=cm.ROW)
        run_c = plgpu.load(s["m"].at[2], layout=cm.COL)
        mask = mask & (cm.rows(run_r, (C, C)) == cm.cols(run_c, (C, C)))
    return mask


def _scores_to_smem(plan: Plan, chunk, s, m_ref, *, scale=1.0):
    """Masked scores ``A`` (times ``scale``) staged as wgmma tiles ``s["p"]`` (+ ``p_lo``)."""
    C, K = plan.chunk, plan.key_dim
    dtype = jnp.dtype(plan.dtype)
    A = pl.run_scoped(
        lambda sq, sk: ch.scores(chunk, sq, sk), cm.tile((C, K), dtype), cm.tile((C, K), dtype)
    )
    A = jnp.where(_causal_same_run(plan, s, m_ref), A, 0.0)
    if scale != 1.0:
        A = scale * A
    cm.store_split(A, s["p"], s.get("p_lo"))
    plgpu.commit_smem()
    return A


def _parts(s):
    return [s["p"]] + ([s["p_lo"]] if "p_lo" in s else [])


def _keep(s, m_ref, row: int):
    return None if m_ref is None else plgpu.load(s["m"].at[row], layout=cm.ROW)


def _value_loop(plan: Plan, fetch, body, *, copies: int, **buffers):
    """The pipeline over value blocks with its buffers in a scope of their own (they
    reuse the shared memory of the intra-chunk phase): ``fetch`` and ``body`` take the
    buffers by keyword."""

    def scoped(bars, **bufs):
        cm.pipeline(
            steps=plan.grad_value_blocks,
            depth=plan.depth,
            barriers=bars,
            fetch=functools.partial(fetch, **bufs),
            body=functools.partial(body, **bufs),
        )
        cm.finish_writes()

    pl.run_scoped(scoped, plgpu.Barrier(num_arrivals=copies, num_barriers=plan.depth), **buffers)


def _output_kernel(q_ref, k_ref, v_ref, st_ref, b_ref, *refs, plan: Plan, **s):
    m_ref = refs[0] if plan.has_runs else None
    o_ref = refs[-1]
    C, K, BV = plan.chunk, plan.key_dim, plan.block_v_grad
    dtype = jnp.dtype(plan.dtype)
    c, bh = lax.axis_index("c"), lax.axis_index("bh")
    bi, h, hq = plan.heads(bh)
    t = pl.ds(c * C, C)
    chunk = _load_chunk(plan, q_ref, k_ref, b_ref, m_ref, s, bi, h, hq, t)
    _scores_to_smem(plan, chunk, s, m_ref)
    u = jnp.exp(chunk.tile("b"))
    keep = _keep(s, m_ref, 0)
    if keep is not None:
        u = u * cm.rows(keep, (C, K))
    s["qe"][...] = (chunk.tile("q") * u).astype(dtype)
    plgpu.commit_smem()

    def fetch(i, slot, barrier, **b):
        vcols = pl.ds(i * BV, BV)
        plgpu.copy_gmem_to_smem(v_ref.at[bi, t, h, vcols], b["v"].at[slot], barrier)
        plgpu.copy_gmem_to_smem(st_ref.at[bi, h, c, :, vcols], b["st"].at[slot], barrier)

    def body(i, slot, carry, **b):
        v_s = b["v"].at[slot]
        o = cm.matmul((C, BV), (s["qe"], b["st"].at[slot]), *[(p, v_s) for p in _parts(s)])
        ob = lax.rem(i, 2)
        cm.before_staging(2)
        b["out"][ob] = (plan.scale * o).astype(dtype)
        cm.write_out([(b["out"].at[ob], o_ref.at[bi, t, h, pl.ds(i * BV, BV)])])
        return carry

    _value_loop(
        plan,
        fetch,
        body,
        copies=2,
        v=cm.tile((plan.depth, C, BV), dtype),
        st=cm.tile((plan.depth, K, BV), dtype),
        out=cm.tile((2, C, BV), dtype),
    )


def _common_scratch(plan: Plan, *, both: bool) -> dict:
    C = plan.chunk
    dtype = jnp.dtype(plan.dtype)
    scratch = _chunk_scratch(plan, both=both)
    scratch["p"] = cm.tile((C, C), dtype)
    if plan.split_scores:
        scratch["p_lo"] = cm.tile((C, C), dtype)
    return scratch


def channel_output(plan: Plan, q, k, v, states, b, masks):
    """``o [B, T, Hv, V]`` for per-channel decays (``b [B, T, Hv, K]``)."""
    B, T, H, V, n = plan.batch, plan.time, plan.v_heads, plan.value_dim, plan.chunks
    C, K = plan.chunk, plan.key_dim
    dtype = jnp.dtype(plan.dtype)
    scratch = _common_scratch(plan, both=False)
    scratch["qe"] = cm.tile((C, K), dtype)
    args = [q, k, v, states, b] + ([masks] if plan.has_runs else [])
    return cm.kernel(
        functools.partial(_output_kernel, plan=plan),
        out_type=jax.ShapeDtypeStruct((B, T, H, V), dtype),
        grid=(n, B * H),
        grid_names=("c", "bh"),
        scratch=scratch,
        interpret=plan.interpret,
        name="linear_attention_output",
    )(*args)


def _dv_kernel(q_ref, k_ref, do_ref, st_ref, dst_ref, b_ref, *refs, plan: Plan, **s):
    m_ref = refs[0] if plan.has_runs else None
    dv_ref, sds_ref = refs[-2], refs[-1]
    C, K, BV = plan.chunk, plan.key_dim, plan.block_v_grad
    dtype = jnp.dtype(plan.dtype)
    c, bh = lax.axis_index("c"), lax.axis_index("bh")
    bi, h, hq = plan.heads(bh)
    t = pl.ds(c * C, C)
    chunk = _load_chunk(plan, q_ref, k_ref, b_ref, m_ref, s, bi, h, hq, t)
    _scores_to_smem(plan, chunk, s, m_ref, scale=plan.scale)
    w = jnp.exp(cm.cols(ch.chunk_row(s["bp"], C - 1), (C, K)) - chunk.tile("b"))
    keep = _keep(s, m_ref, 1)
    if keep is not None:
        w = w * cm.rows(keep, (C, K))
    s["kw"][...] = (chunk.tile("k") * w).astype(dtype)
    plgpu.commit_smem()

    def fetch(i, slot, barrier, **b):
        vcols = pl.ds(i * BV, BV)
        plgpu.copy_gmem_to_smem(do_ref.at[bi, t, h, vcols], b["do"].at[slot], barrier)
        plgpu.copy_gmem_to_smem(st_ref.at[bi, h, c, :, vcols], b["st"].at[slot], barrier)
        plgpu.copy_gmem_to_smem(dst_ref.at[bi, h, c, :, vcols], b["dst"].at[slot], barrier)

    def body(i, slot, carry, **b):
        do_s, st_s, dst_s = b["do"].at[slot], b["st"].at[slot], b["dst"].at[slot]
        ob = lax.rem(i, 2)
        cm.before_staging(2)
        for r0 in range(0, K, 64):
            r = pl.ds(r0, 64)
            prod = st_s.at[r][...].astype(F32) * dst_s.at[r][...].astype(F32)
            b["sds"][ob, r] = jnp.sum(prod, axis=1)
        dv = cm.matmul((C, BV), (s["kw"], dst_s), *[(p.T, do_s) for p in _parts(s)])
        b["out"][ob] = dv.astype(dtype)
        cm.write_out(
            [
                (b["out"].at[ob], dv_ref.at[bi, t, h, pl.ds(i * BV, BV)]),
                (b["sds"].at[ob], sds_ref.at[i, bi, h, c]),
            ]
        )
        return carry

    D = plan.depth
    _value_loop(
        plan,
        fetch,
        body,
        copies=3,
        do=cm.tile((D, C, BV), dtype),
        st=cm.tile((D, K, BV), dtype),
        dst=cm.tile((D, K, BV), dtype),
        out=cm.tile((2, C, BV), dtype),
        sds=cm.vector((2, K)),
    )


def channel_dv(plan: Plan, q, k, do, states, dstates, b, masks):
    """``(dv [B, T, Hv, V], sds [nV, B, Hv, n, K])`` for per-channel decays."""
    B, T, H, V, n = plan.batch, plan.time, plan.v_heads, plan.value_dim, plan.chunks
    C, K, BV = plan.chunk, plan.key_dim, plan.block_v_grad
    dtype = jnp.dtype(plan.dtype)
    scratch = _common_scratch(plan, both=False)
    scratch["kw"] = cm.tile((C, K), dtype)
    args = [q, k, do, states, dstates, b] + ([masks] if plan.has_runs else [])
    return cm.kernel(
        functools.partial(_dv_kernel, plan=plan),
        out_type=(
            jax.ShapeDtypeStruct((B, T, H, V), dtype),
            jax.ShapeDtypeStruct((V // BV, B, H, n, K), F32),
        ),
        grid=(n, B * H),
        grid_names=("c", "bh"),
        scratch=scratch,
        interpret=plan.interpret,
        name="linear_attention_dv",
    )(*args)


def _dqk_kernel(q_ref, k_ref, v_ref, do_ref, st_ref, dst_ref, b_ref, *refs, plan: Plan, **s):
    m_ref = refs[0] if plan.has_runs else None
    dq_ref, dk_ref, db_ref, kdk_ref = refs[-4:]
    C, K, BV, D = plan.chunk, plan.key_dim, plan.block_v_grad, plan.depth
    dtype = jnp.dtype(plan.dtype)
    c, bh = lax.axis_index("c"), lax.axis_index("bh")
    bi, h, hq = plan.heads(bh)
    t = pl.ds(c * C, C)
    chunk = _load_chunk(plan, q_ref, k_ref, b_ref, m_ref, s, bi, h, hq, t)

    def fetch(v_s, do_s, st_s, dst_s):
        def fetch(i, slot, barrier):
            vcols = pl.ds(i * BV, BV)
            plgpu.copy_gmem_to_smem(v_ref.at[bi, t, h, vcols], v_s.at[slot], barrier)
            plgpu.copy_gmem_to_smem(do_ref.at[bi, t, h, vcols], do_s.at[slot], barrier)
            plgpu.copy_gmem_to_smem(st_ref.at[bi, h, c, :, vcols], st_s.at[slot], barrier)
            plgpu.copy_gmem_to_smem(dst_ref.at[bi, h, c, :, vcols], dst_s.at[slot], barrier)

        return fetch

    def accumulate(v_s, do_s, st_s, dst_s, bars):
        return pl.run_scoped(
            functools.partial(_accumulate, v_s, do_s, st_s, dst_s, bars),
            plgpu.ACC((C, C), F32),
            plgpu.ACC((C, K), F32),
            plgpu.ACC((C, K), F32),
        )

    def _accumulate(v_s, do_s, st_s, dst_s, bars, d_a, dq_st, dk_st):
        def body(i, slot, carry):
            plgpu.wgmma(d_a, do_s.at[slot], v_s.at[slot].T)
            plgpu.wgmma(dq_st, do_s.at[slot], st_s.at[slot].T)
            plgpu.wgmma(dk_st, v_s.at[slot], dst_s.at[slot].T)
            plgpu.wgmma_wait(0)
            return carry

        cm.pipeline(
            steps=plan.grad_value_blocks,
            depth=D,
            barriers=bars,
            fetch=fetch(v_s, do_s, st_s, dst_s),
            body=body,
        )
        return d_a[...], dq_st[...], dk_st[...]

    d_a, dq_st, dk_st = pl.run_scoped(
        accumulate,
        cm.tile((D, C, BV), dtype),
        cm.tile((D, C, BV), dtype),
        cm.tile((D, K, BV), dtype),
        cm.tile((D, K, BV), dtype),
        plgpu.Barrier(num_arrivals=4, num_barriers=D),
    )

    def finish(p, *bufs):
        p_lo = bufs[0] if plan.split_scores else None
        stage, db_s, out, kdk_s, vec = bufs[-5:]
        parts = [p] + ([p_lo] if p_lo is not None else [])
        dA = jnp.where(_causal_same_run(plan, s, m_ref), plan.scale * d_a, 0.0)
        cm.store_split(dA, p, p_lo)
        plgpu.commit_smem()
        b = chunk.tile("b")
        u = jnp.exp(b)
        w = jnp.exp(cm.cols(ch.chunk_row(s["bp"], C - 1), (C, K)) - b)
        keep_prev, keep_last = _keep(s, m_ref, 0), _keep(s, m_ref, 1)
        if keep_prev is not None:
            u = u * cm.rows(keep_prev, (C, K))
            w = w * cm.rows(keep_last, (C, K))
        dq = plan.scale * u * dq_st + ch.dq_intra(chunk, dA, parts, stage)
        db_s[...] = chunk.tile("q") * dq  # parked: registers are scarce here
        # outputs leave through SMEM and TMA (whole 32-byte sectors per store)
        out[...] = dq.astype(out.dtype)
        cm.write_out([(out, dq_ref.at[bi, t, h])])
        k = chunk.tile("k")
        dks = w * dk_st
        kdk_s[...] = jnp.sum(k * dks, axis=0)
        dk = dks + ch.dk_intra(chunk, dA, parts, stage, vec)
        db_s[...] = db_s[...] - k * dk
        cm.before_staging(1)
        out[...] = dk.astype(out.dtype)
        cm.write_out(
            [
                (out, dk_ref.at[bi, t, h]),
                (db_s, db_ref.at[bi, t, h]),
                (kdk_s, kdk_ref.at[bi, h, c]),
            ]
        )
        cm.finish_writes()

    pl.run_scoped(
        finish,
        *[cm.tile((C, C), dtype)] * (2 if plan.split_scores else 1),
        cm.tile((C, K), dtype),
        cm.tile((C, K), F32),
        cm.tile((C, K), dq_ref.dtype),
        cm.vector((K,)),
        ch.padded_vector(C),
    )


def channel_dqk(plan: Plan, q, k, v, do, states, dstates, b, masks, grad_dtype):
    """``(dq, dk [B, T, Hv, K] in grad_dtype, db [B, T, Hv, K] float32, kdk [B, Hv, n, K]
    float32)`` for per-channel decays: ``db = q * dq - k * dk`` per channel and ``kdk``
    the column sums of ``k * dk^state`` (part of each chunk's last-token term)."""
    B, T, H, n = plan.batch, plan.time, plan.v_heads, plan.chunks
    K = plan.key_dim
    scratch = _chunk_scratch(plan, both=True)
    args = [q, k, v, do, states, dstates, b] + ([masks] if plan.has_runs else [])
    return cm.kernel(
        functools.partial(_dqk_kernel, plan=plan),
        out_type=(
            jax.ShapeDtypeStruct((B, T, H, K), grad_dtype),
            jax.ShapeDtypeStruct((B, T, H, K), grad_dtype),
            jax.ShapeDtypeStruct((B, T, H, K), F32),
            jax.ShapeDtypeStruct((B, H, n, K), F32),
        ),
        grid=(n, B * H),
        grid_names=("c", "bh"),
        scratch=scratch,
        interpret=plan.interpret,
        name="linear_attention_dqk",
    )(*args)
