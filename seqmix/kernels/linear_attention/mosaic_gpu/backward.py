"""Per-chunk gradients of the chunked form (scalar or no decay), all chunks in parallel.

With ``S_c`` the state entering chunk ``c`` and ``dS_{c+1}`` the gradient of the state
leaving it (``state.state_pass``), ``D_ts = exp(b_t - b_s)`` over allowed pairs (``s <=
t``, same run), ``w_s = exp(b_last - b_s) [run_s = run_last]`` and ``u_t = exp(b_t) [run_t
= run_prev]``:

    dv_s = scale sum_t (q_t . k_s) D_ts do_t + w_s (k_s^T dS_{c+1})
    dq_t = scale u_t (do_t S_c^T) + scale sum_s (do_t . v_s) D_ts k_s
    dk_s = w_s (v_s dS_{c+1}^T)   + scale sum_t (do_t . v_s) D_ts q_t

and the gradient with respect to ``b`` (``d log_decay`` follows in XLA through the
cumulative sum): ``db_t = q_t . dq_t - k_t . dk_t``, plus at the chunk's last token
``a_c sum(S_c * dS_{c+1}) + sum_s k_s . dk^state_s`` (``a_c = exp(b_last) [run_last =
run_prev]``: the dependence of ``S_{c+1}`` on ``b_last``).

``chunk_dv`` runs over (group of chunks, batch * v head, value block) and also returns the
row sums of ``S_c * dS_{c+1}`` of its value block; ``chunk_dqk`` runs over (chunk, batch *
v head) and walks the value blocks through a TMA pipeline, accumulating ``do v^T``, ``do
S_c^T`` and ``v dS_{c+1}^T`` in three wgmma accumulators, then finishes dq, dk and the
per-token parts of ``db``. dq and dk come per v head and are summed over each group of
heads in XLA.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from seqmix.kernels.linear_attention.mosaic_gpu import channel_kernels
from seqmix.kernels.linear_attention.mosaic_gpu import common as cm
from seqmix.kernels.linear_attention.mosaic_gpu.forward import apply_intra, intra_decay
from seqmix.kernels.linear_attention.mosaic_gpu.plan import Plan

F32 = jnp.float32


def _weights(plan: Plan, b_s, m_s, *, last: bool):
    """``[C]`` ROW vector ``w = exp(b_last - b) [run = run_last]`` (``last``) or ``u =
    exp(b) [run = run_prev]``; None when it is all ones."""
    C = plan.chunk
    out = None
    if b_s is not None:
        b = plgpu.load(b_s, layout=cm.ROW)
        out = jnp.exp(b_s[C - 1] - b) if last else jnp.exp(b)
    if m_s is not None:
        keep = plgpu.load(m_s.at[1 if last else 0], layout=cm.ROW)
        out = keep if out is None else out * keep
    return out


def _scale_rows(x, vec):
    return x if vec is None else x * cm.rows(vec, x.shape)


def _dv_kernel(q_ref, k_ref, do_ref, st_ref, dst_ref, *refs, plan: Plan, **s):
    it = iter(refs)
    b_ref = next(it) if plan.decay == "scalar" else None
    m_ref = next(it) if plan.has_runs else None
    dv_ref, sds_ref = next(it), next(it)
    C, K, BV, G = plan.chunk, plan.key_dim, plan.block_v_grad, plan.chunks_per_program
    dtype = jnp.dtype(plan.dtype)
    cg, bh, vb = lax.axis_index("cg"), lax.axis_index("bh"), lax.axis_index("vb")
    bi, h, hq = plan.heads(bh)
    vcols = pl.ds(vb * BV, BV)

    def fetch(i, slot, barrier):
        c = cg * G + i
        t = pl.ds(c * C, C)
        plgpu.copy_gmem_to_smem(q_ref.at[bi, t, hq], s["q"].at[slot], barrier)
        plgpu.copy_gmem_to_smem(k_ref.at[bi, t, hq], s["k"].at[slot], barrier)
        plgpu.copy_gmem_to_smem(do_ref.at[bi, t, h, vcols], s["do"].at[slot], barrier)
        plgpu.copy_gmem_to_smem(st_ref.at[bi, h, c, :, vcols], s["st"].at[slot], barrier)
        plgpu.copy_gmem_to_smem(dst_ref.at[bi, h, c, :, vcols], s["dst"].at[slot], barrier)
        if b_ref is not None:
            plgpu.copy_gmem_to_smem(b_ref.at[bi, h, t], s["b"].at[slot], barrier)
        if m_ref is not None:
            plgpu.copy_gmem_to_smem(m_ref.at[bi, :, t], s["m"].at[slot], barrier)

    def body(i, slot, carry):
        c = cg * G + i
        t = pl.ds(c * C, C)
        q_s, k_s, do_s = s["q"].at[slot], s["k"].at[slot], s["do"].at[slot]
        st_s, dst_s = s["st"].at[slot], s["dst"].at[slot]
        b_s = None if b_ref is None else s["b"].at[slot]
        m_s = None if m_ref is None else s["m"].at[slot]
        ob = lax.rem(i, 2)
        cm.before_staging(2)
        # Row sums of S_c * dS_{c+1} over this value block, 64 state rows at a time.
        for r0 in range(0, K, 64):
            r = pl.ds(r0, 64)
            prod = st_s.at[r][...].astype(F32) * dst_s.at[r][...].astype(F32)
            s["sds"][ob, r] = jnp.sum(prod, axis=1)
        scores_t = cm.matmul((C, C), (k_s, q_s.T))  # [s, t]
        cm.store_split(
            apply_intra(scores_t, intra_decay(plan, b_s, m_s, transpose=True)),
            s["p"],
            s.get("p_lo"),
        )
        plgpu.commit_smem()
        dv = _scale_rows(cm.matmul((C, BV), (k_s, dst_s)), _weights(plan, b_s, m_s, last=True))
        pairs = [(s["p"], do_s)] + ([(s["p_lo"], do_s)] if "p_lo" in s else [])
        dv = dv + plan.scale * cm.matmul((C, BV), *pairs)
        s["out"][ob] = dv.astype(dtype)
        cm.write_out(
            [
                (s["out"].at[ob], dv_ref.at[bi, t, h, vcols]),
                (s["sds"].at[ob], sds_ref.at[vb, bi, h, c]),
            ]
        )
        return carry

    cm.pipeline(steps=G, depth=plan.depth, barriers=s["bars"], fetch=fetch, body=body)
    cm.finish_writes()


def chunk_dv(plan: Plan, q, k, do, states, dstates, b, masks):
    """``(dv [B, T, Hv, V] in do's dtype, sds [nV, B, Hv, n, K] float32)``: the value
    gradient and, per value block, the row sums of ``S_c * dS_{c+1}``."""
    B, T, H, V, n = plan.batch, plan.time, plan.v_heads, plan.value_dim, plan.chunks
    C, K, BV, D = plan.chunk, plan.key_dim, plan.block_v_grad, plan.depth
    dtype = jnp.dtype(plan.dtype)
    args = [q, k, do, states, dstates]
    copies = 5
    scratch = {
        "q": cm.tile((D, C, K), dtype),
        "k": cm.tile((D, C, K), dtype),
        "do": cm.tile((D, C, BV), dtype),
        "st": cm.tile((D, K, BV), dtype),
        "dst": cm.tile((D, K, BV), dtype),
        "p": cm.tile((C, C), dtype),
        "out": cm.tile((2, C, BV), dtype),
        "sds": cm.vector((2, K)),
    }
    if plan.split_scores:
        scratch["p_lo"] = cm.tile((C, C), dtype)
    if plan.decay == "scalar":
        args.append(b)
        scratch["b"] = cm.vector((D, C))
        copies += 1
    if plan.has_runs:
        args.append(masks)
        scratch["m"] = cm.vector((D, 3, C))
        copies += 1
    scratch["bars"] = plgpu.Barrier(num_arrivals=copies, num_barriers=D)
    return cm.kernel(
        functools.partial(_dv_kernel, plan=plan),
        out_type=(
            jax.ShapeDtypeStruct((B, T, H, V), dtype),
            jax.ShapeDtypeStruct((V // BV, B, H, n, K), F32),
        ),
        grid=(n // plan.chunks_per_program, B * H, V // BV),
        grid_names=("cg", "bh", "vb"),
        scratch=scratch,
        interpret=plan.interpret,
        name="linear_attention_dv",
    )(*args)


def _dqk_kernel(q_ref, k_ref, v_ref, do_ref, st_ref, dst_ref, *refs, plan: Plan, **s):
    it = iter(refs)
    b_ref = next(it) if plan.decay == "scalar" else None
    m_ref = next(it) if plan.has_runs else None
    dq_ref, dk_ref, db_ref, kdk_ref = next(it), next(it), next(it), next(it)
    C, K, BV = plan.chunk, plan.key_dim, plan.block_v_grad
    c, bh = lax.axis_index("c"), lax.axis_index("bh")
    bi, h, hq = plan.heads(bh)
    t = pl.ds(c * C, C)

    # Per-chunk operands, awaited after the value-block loop has started.
    plgpu.copy_gmem_to_smem(q_ref.at[bi, t, hq], s["q"], s["chunk_bar"])
    plgpu.copy_gmem_to_smem(k_ref.at[bi, t, hq], s["k"], s["chunk_bar"])
    if b_ref is not None:
        plgpu.copy_gmem_to_smem(b_ref.at[bi, h, t], s["b"], s["chunk_bar"])
    if m_ref is not None:
        plgpu.copy_gmem_to_smem(m_ref.at[bi, :, t], s["m"], s["chunk_bar"])

    def fetch(i, slot, barrier):
        vcols = pl.ds(i * BV, BV)
        plgpu.copy_gmem_to_smem(v_ref.at[bi, t, h, vcols], s["v"].at[slot], barrier)
        plgpu.copy_gmem_to_smem(do_ref.at[bi, t, h, vcols], s["do"].at[slot], barrier)
        plgpu.copy_gmem_to_smem(st_ref.at[bi, h, c, :, vcols], s["st"].at[slot], barrier)
        plgpu.copy_gmem_to_smem(dst_ref.at[bi, h, c, :, vcols], s["dst"].at[slot], barrier)

    def accumulate(d_a, dq_st, dk_st):
        def body(i, slot, carry):
            v_s, do_s = s["v"].at[slot], s["do"].at[slot]
            plgpu.wgmma(d_a, do_s, v_s.T)
            plgpu.wgmma(dq_st, do_s, s["st"].at[slot].T)
            plgpu.wgmma(dk_st, v_s, s["dst"].at[slot].T)
            plgpu.wgmma_wait(0)
            return carry

        cm.pipeline(
            steps=plan.grad_value_blocks,
            depth=plan.depth,
            barriers=s["bars"],
            fetch=fetch,
            body=body,
        )
        return d_a[...], dq_st[...], dk_st[...]

    d_a, dq_st, dk_st = pl.run_scoped(
        accumulate,
        plgpu.ACC((C, C), F32),
        plgpu.ACC((C, K), F32),
        plgpu.ACC((C, K), F32),
    )
    plgpu.barrier_wait(s["chunk_bar"])
    b_s = None if b_ref is None else s["b"]
    m_s = None if m_ref is None else s["m"]
    d_a = plan.scale * apply_intra(d_a, intra_decay(plan, b_s, m_s))
    cm.store_split(d_a, s["p"], s.get("p_lo"))
    plgpu.commit_smem()
    lo = "p_lo" in s

    dq = _scale_rows(plan.scale * dq_st, _weights(plan, b_s, m_s, last=False))
    dq = dq + cm.matmul((C, K), (s["p"], s["k"]), *([(s["p_lo"], s["k"])] if lo else []))
    db = jnp.sum(s["q"][...].astype(F32) * dq, axis=1)
    s["out"][0] = dq.astype(s["out"].dtype)

    dk_st = _scale_rows(dk_st, _weights(plan, b_s, m_s, last=True))
    kdk = jnp.sum(s["k"][...].astype(F32) * dk_st, axis=1)
    dk = dk_st + cm.matmul((C, K), (s["p"].T, s["q"]), *([(s["p_lo"].T, s["q"])] if lo else []))
    db = db - jnp.sum(s["k"][...].astype(F32) * dk, axis=1)
    s["out"][1] = dk.astype(s["out"].dtype)
    s["db"][0] = db
    s["db"][1] = kdk
    cm.write_out(
        [
            (s["out"].at[0], dq_ref.at[bi, t, h]),
            (s["out"].at[1], dk_ref.at[bi, t, h]),
            (s["db"].at[0], db_ref.at[bi, h, t]),
            (s["db"].at[1], kdk_ref.at[bi, h, t]),
        ]
    )
    cm.finish_writes()


def chunk_dqk(plan: Plan, q, k, v, do, states, dstates, b, masks, grad_dtype):
    """``(dq, dk [B, T, Hv, K] in grad_dtype, db, kdk [B, Hv, T] float32)``: dq and dk per
    v head, ``q . dq - k . dk`` per token, and ``k . dk^state`` per token (summed over
    a chunk it is part of the chunk's last-token term)."""
    B, T, H, n = plan.batch, plan.time, plan.v_heads, plan.chunks
    C, K, BV, D = plan.chunk, plan.key_dim, plan.block_v_grad, plan.depth
    dtype = jnp.dtype(plan.dtype)
    args = [q, k, v, do, states, dstates]
    chunk_copies = 2
    scratch = {
        "q": cm.tile((C, K), dtype),
        "k": cm.tile((C, K), dtype),
        "v": cm.tile((D, C, BV), dtype),
        "do": cm.tile((D, C, BV), dtype),
        "st": cm.tile((D, K, BV), dtype),
        "dst": cm.tile((D, K, BV), dtype),
        "p": cm.tile((C, C), dtype),
        "out": cm.tile((2, C, K), grad_dtype),
        "db": cm.vector((2, C)),
        "bars": plgpu.Barrier(num_arrivals=4, num_barriers=D),
    }
    if plan.split_scores:
        scratch["p_lo"] = cm.tile((C, C), dtype)
    if plan.decay == "scalar":
        args.append(b)
        scratch["b"] = cm.vector((C,))
        chunk_copies += 1
    if plan.has_runs:
        args.append(masks)
        scratch["m"] = cm.vector((3, C))
        chunk_copies += 1
    scratch["chunk_bar"] = plgpu.Barrier(num_arrivals=chunk_copies)
    return cm.kernel(
        functools.partial(_dqk_kernel, plan=plan),
        out_type=(
            jax.ShapeDtypeStruct((B, T, H, K), grad_dtype),
            jax.ShapeDtypeStruct((B, T, H, K), grad_dtype),
            jax.ShapeDtypeStruct((B, H, T), F32),
            jax.ShapeDtypeStruct((B, H, T), F32),
        ),
        grid=(n, B * H),
        grid_names=("c", "bh"),
        scratch=scratch,
        interpret=plan.interpret,
        name="linear_attention_dqk",
    )(*args)


def chunk_grads(plan: Plan, q, k, v, b, masks, do, states, dstates):
    """``(dq, dk, dv, db)`` of the padded inputs: dq / dk summed over each group of v
    heads, ``db`` (None without decay) the gradient with respect to the chunk-local
    cumulative log decays (``[B, Hv, T]`` scalar, ``[B, T, Hv, K]`` per channel)."""
    G = plan.groups
    grad_dtype = q.dtype if G == 1 else jnp.dtype(F32)
    if plan.decay == "channel":
        dv, sds = channel_kernels.channel_dv(plan, q, k, do, states, dstates, b, masks)
        dq, dk, db, kdk = channel_kernels.channel_dqk(
            plan, q, k, v, do, states, dstates, b, masks, grad_dtype
        )
    else:
        dv, sds = chunk_dv(plan, q, k, do, states, dstates, b, masks)
        dq, dk, db, kdk = chunk_dqk(plan, q, k, v, do, states, dstates, b, masks, grad_dtype)
    if G > 1:
        B, T, _, K = q.shape
        dq = dq.reshape(B, T, plan.qk_heads, G, K).sum(3).astype(q.dtype)
        dk = dk.reshape(B, T, plan.qk_heads, G, K).sum(3).astype(k.dtype)
    if b is None:
        return dq, dk, dv, None
    B, H, n, C, T = plan.batch, plan.v_heads, plan.chunks, plan.chunk, plan.time
    carry = None if masks is None else masks[:, 0, C - 1 :: C]  # [B, n]
    if plan.decay == "channel":
        # chunk c's last-token term per channel: a_c * rowsum(S_c dS_{c+1}) + kdk_c
        a = jnp.exp(jnp.moveaxis(b[:, C - 1 :: C], 1, 2))  # [B, Hv, n, K]
        if carry is not None:
            a = a * carry[:, None, :, None]
        at_last = jnp.moveaxis(a * sds.sum(0) + kdk, 2, 1)  # [B, n, Hv, K]
        db = db.reshape(B, n, C, H, -1).at[:, :, -1].add(at_last).reshape(B, T, H, -1)
        return dq, dk, dv, db
    a = jnp.exp(b[:, :, C - 1 :: C])
    if carry is not None:
        a = a * carry[:, None]
    at_last = a * sds.sum((0, 4)) + kdk.reshape(B, H, n, C).sum(3)
    db = db.reshape(B, H, n, C).at[..., -1].add(at_last).reshape(B, H, T)
    return dq, dk, dv, db
