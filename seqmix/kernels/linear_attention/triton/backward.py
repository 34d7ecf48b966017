"""Per-chunk gradients of the chunked form, all chunks in parallel.

With ``S_c`` the state entering chunk ``c``, ``dS_{c+1}`` the gradient of the state leaving
it (``state``), ``A_ts = q_t . (k_s exp(b_t - b_s))`` over allowed pairs (causal, same
run), ``w_s = [run_s = run_last] exp(b_last - b_s)`` and ``u_t = [run_t = run_prev] exp(b_t)``:

    dv_s = scale * sum_t A_ts do_t + (k_s w_s)^T dS_{c+1}
    dq_t = scale * u_t (S_c do_t) + scale * sum_s (do_t . v_s) exp(b_t - b_s) k_s
    dk_s = w_s (dS_{c+1} v_s)     + scale * sum_t (do_t . v_s) exp(b_t - b_s) q_t

(products with exp(...) are per channel for per-channel decays). The log-decay gradient uses
``b_t = sum_{u <= t} g_u`` inside the chunk: ``d b_t = q_t dq_t - k_t dk_t`` per channel,
plus at the chunk's last token ``[run_last = run_prev] exp(b_last) rowsum(S_c * dS_{c+1})
+ sum_s k_s dk^state_s`` (the dependence of ``S_{c+1}`` on ``b_last``), and ``dg_u =
sum_{t >= u} d b_t`` within the chunk. Scalar decays sum the channels.

With the two-level state pass the stored ``S_c`` and ``dS_{c+1}`` are local to their segment
and are completed tile by tile in registers (``chunk.completed``).

``chunk_dv`` runs over (value block, chunk, batch * v head), ``chunk_dqk`` over (key block,
chunk, batch * v head); dq and dk come per v head and are summed over groups by the caller.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from seqmix.kernels.linear_attention.triton import chunk as tc
from seqmix.kernels.linear_attention.triton.plan import Plan

f32 = jnp.float32


def _dv_kernel(*refs, plan: Plan):
    it = iter(refs)
    q_ref, k_ref = next(it), next(it)
    g_ref = next(it) if plan.decay != "none" else None
    r_ref = next(it) if plan.has_runs else None
    do_ref, ds_ref = next(it), next(it)
    dseg_ref, df_ref = (next(it), next(it)) if plan.segmented else (None, None)
    dv_ref = next(it)
    L, n, BK = plan.sub_chunk, plan.subs, plan.block_k
    BV = dv_ref.shape[-1]
    start = pl.multiple_of(pl.program_id(1) * plan.chunk, plan.chunk)
    runs = tc.chunk_runs(plan, r_ref, start)
    acc = [jnp.zeros((L, BV), f32) for _ in range(n)]

    def state_term(kb, qt, kt, bt, ends):
        del qt
        dS = ds_ref[pl.ds(kb * BK, BK), :]
        if dseg_ref is not None:
            dS = tc.completed(
                dS,
                dseg_ref[pl.ds(kb * BK, BK), :],
                tc.chunk_factor(plan, df_ref, pl.ds(kb * BK, BK)),
            )
        for j in range(n):
            kw = kt[j] if bt is None else kt[j].astype(f32) * jnp.exp(ends[-1][None, :] - bt[j])
            acc[j] = acc[j] + tc.dot(kw, dS, plan.state_mma)

    A, b = tc.attention_blocks(plan, q_ref, k_ref, g_ref, runs, per_block=state_term)
    for j in range(n):
        dv = acc[j]
        if b is not None:
            dv = dv * jnp.exp(tc.last(b) - b)[:, None]
        if runs is not None:
            dv = jnp.where(runs.keep_last(j)[:, None], dv, 0.0)
        for i in range(j, n):
            do_i = do_ref[pl.ds(i * L, L), :]
            dv = dv + plan.scale * tc.dot_split(
                A[(i, j)], do_i, plan.mma, plan.split_scores, trans_a=True
            )
        dv_ref[pl.ds(j * L, L), :] = dv.astype(dv_ref.dtype)


def _dqk_kernel(*refs, plan: Plan):
    it = iter(refs)
    q_ref, k_ref, v_ref = next(it), next(it), next(it)
    g_ref = next(it) if plan.decay != "none" else None
    r_ref = next(it) if plan.has_runs else None
    do_ref, s_ref, ds_ref = next(it), next(it), next(it)
    if plan.segmented:
        seg_ref, f_ref, dseg_ref, df_ref = next(it), next(it), next(it), next(it)
    dq_ref, dk_ref = next(it), next(it)
    dg_ref = next(it) if plan.decay != "none" else None
    L, n, BV = plan.sub_chunk, plan.subs, plan.block_v
    BK = dq_ref.shape[-1]
    start = pl.multiple_of(pl.program_id(1) * plan.chunk, plan.chunk)
    runs = tc.chunk_runs(plan, r_ref, start)
    rows = [pl.ds(i * L, L) for i in range(n)]
    pairs = [(i, j) for i in range(n) for j in range(i + 1)]

    # Sums over the value dimension: dA = do v^T, do S_c^T, v dS_{c+1}^T, rowsum(S dS).
    dA = {p: jnp.zeros((L, L), f32) for p in pairs}
    dq_state = [jnp.zeros((L, BK), f32) for _ in range(n)]
    dk_state = [jnp.zeros((L, BK), f32) for _ in range(n)]
    s_ds = jnp.zeros((BK,), f32)
    if plan.segmented:
        f, df = tc.chunk_factor(plan, f_ref), tc.chunk_factor(plan, df_ref)
    for vb in range(plan.value_dim // BV):
        cols = pl.ds(vb * BV, BV)
        do_t = [do_ref[r, cols] for r in rows]
        v_t = [v_ref[r, cols] for r in rows]
        S = s_ref[:, cols]
        dS = ds_ref[:, cols]
        if plan.segmented:
            S = tc.completed(S, seg_ref[:, cols], f)
            dS = tc.completed(dS, dseg_ref[:, cols], df)
        for i, j in pairs:
            dA[(i, j)] += tc.dot(do_t[i], v_t[j], plan.mma, trans_b=True)
        for i in range(n):
            dq_state[i] += tc.dot(do_t[i], S, plan.state_mma, trans_b=True)
            dk_state[i] += tc.dot(v_t[i], dS, plan.state_mma, trans_b=True)
        if dg_ref is not None:
            s_ds += jnp.sum(S.astype(f32) * dS.astype(f32), axis=1)

    q_t = [q_ref[r, :] for r in rows]
    k_t = [k_ref[r, :] for r in rows]
    b = bt = ends = None
    if plan.decay == "scalar":
        b = tc.scalar_decay(g_ref, pl.ds(0, plan.chunk))
        b_last = tc.last(b)
    elif plan.decay == "channel":
        bt, ends = tc.channel_decay(plan, g_ref, pl.ds(0, BK))
        b_last = ends[-1]

    # State terms.
    dq, dk = [], []
    for i in range(n):
        dqi, dki = plan.scale * dq_state[i], dk_state[i]
        if b is not None:
            dqi = dqi * jnp.exp(b)[:, None]
            dki = dki * jnp.exp(b_last - b)[:, None]
        elif bt is not None:
            dqi = dqi * jnp.exp(bt[i])
            dki = dki * jnp.exp(b_last[None, :] - bt[i])
        if runs is not None:
            dqi = jnp.where(runs.keep_prev(i)[:, None], dqi, 0.0)
            dki = jnp.where(runs.keep_last(i)[:, None], dki, 0.0)
        dq.append(dqi)
        dk.append(dki)
    dk_from_state = list(dk)

    # Intra-chunk terms.
    for i, j in pairs:
        m = tc.intra_mask(plan, runs, i, j)
        dAij = plan.scale * dA[(i, j)]
        if plan.decay == "channel" and i == j:
            diff = bt[i][:, None, :] - bt[i][None, :, :]
            e = dAij[:, :, None] * tc.masked_exp(m[:, :, None], diff)
            dq[i] = dq[i] + jnp.sum(e * k_t[i].astype(f32)[None, :, :], axis=1)
            dk[i] = dk[i] + jnp.sum(e * q_t[i].astype(f32)[:, None, :], axis=0)
            continue
        if plan.decay == "scalar":
            dAij = dAij * tc.masked_exp(m, b[:, None] - b[None, :])
        elif m is not None:
            dAij = jnp.where(m, dAij, 0.0)
        if plan.decay == "channel":  # j < i, through the end of key sub-chunk j
            to_end = jnp.exp(bt[i] - ends[j][None, :])
            from_end = jnp.exp(ends[j][None, :] - bt[j])
            kf = k_t[j].astype(f32) * from_end
            qf = q_t[i].astype(f32) * to_end
            dq[i] = dq[i] + tc.dot_split(dAij, kf, plan.mma, plan.split_scores) * to_end
            dk[j] = (
                dk[j] + tc.dot_split(dAij, qf, plan.mma, plan.split_scores, trans_a=True) * from_end
            )
        else:
            dq[i] = dq[i] + tc.dot_split(dAij, k_t[j], plan.mma, plan.split_scores)
            dk[j] = dk[j] + tc.dot_split(dAij, q_t[i], plan.mma, plan.split_scores, trans_a=True)

    for i in range(n):
        dq_ref[rows[i], :] = dq[i].astype(dq_ref.dtype)
        dk_ref[rows[i], :] = dk[i].astype(dk_ref.dtype)
    if dg_ref is None:
        return

    # Log-decay gradient: reverse cumulative sum of d b within the chunk.
    db = [q_t[i].astype(f32) * dq[i] - k_t[i].astype(f32) * dk[i] for i in range(n)]
    carry = jnp.exp(b_last)
    if runs is not None:
        carry = jnp.where(runs.carries(), carry, 0.0)
    at_last = carry * s_ds
    for i in range(n):
        at_last = at_last + jnp.sum(k_t[i].astype(f32) * dk_from_state[i], axis=0)
    if plan.decay == "scalar":
        dg_ref[...] = tc.reverse_cumsum(jnp.sum(db[0], axis=1)) + jnp.sum(at_last)
        return
    suffix = at_last
    for i in reversed(range(n)):
        dg_ref[rows[i], :] = tc.reverse_cumsum(db[i]) + suffix[None, :]
        suffix = suffix + jnp.sum(db[i], axis=0)


def chunk_dv(plan: Plan, q, k, g, runs, do, dstates, dsegments=None):
    """``dv [B, T, Hv, V]`` in v's dtype (``do``'s dtype); ``dsegments = (leaving, factors)``
    of the two-level pass when ``plan.segmented``."""
    B, T, Hv, V = plan.batch, plan.time, plan.v_heads, plan.value_dim
    BV = plan.block_v
    sp = tc.ChunkSpecs(plan, "v", BV)
    specs, args = [sp.qk(), sp.qk()], [q, k]
    if g is not None:
        specs.append(sp.g(g.ndim))
        args.append(g)
    if runs is not None:
        specs.append(sp.runs())
        args.append(runs)
    specs += [sp.v(), sp.state()]
    args += [do, dstates]
    if plan.segmented:
        specs += [sp.segment_state(), sp.factor()]
        args += list(dsegments)
    return pl.pallas_call(
        functools.partial(_dv_kernel, plan=plan),
        grid=(V // BV, plan.chunks, B * Hv),
        in_specs=specs,
        out_specs=sp.v(),
        out_shape=jax.ShapeDtypeStruct((B, T, Hv, V), do.dtype),
        compiler_params=plan.compiler_params("dv"),
        interpret=plan.interpret,
        name="linear_attention_chunk_dv",
    )(*args)


def chunk_dqk(
    plan: Plan, q, k, v, g, runs, do, states, dstates, grad_dtype, segments=None, dsegments=None
):
    """``(dq, dk)`` per v head ``[B, T, Hv, K]`` in ``grad_dtype`` and the log-decay
    gradient: per channel ``[B, T, Hv, K]``, or for scalar decay ``[nK, B, T, Hv]``
    partial sums over key blocks (None without decay); float32. ``segments`` /
    ``dsegments``: the two-level pass's completions of ``states`` / ``dstates``."""
    B, T, Hv, K = plan.batch, plan.time, plan.v_heads, plan.key_dim
    BK = plan.block_k
    nk = K // BK
    sp = tc.ChunkSpecs(plan, "k", BK)
    specs, args = [sp.qk(), sp.qk(), sp.v()], [q, k, v]
    if g is not None:
        specs.append(sp.g(g.ndim))
        args.append(g)
    if runs is not None:
        specs.append(sp.runs())
        args.append(runs)
    specs += [sp.v(), sp.state(), sp.state()]
    args += [do, states, dstates]
    if plan.segmented:
        specs += [sp.segment_state(), sp.factor()] * 2
        args += [*segments[:2], *dsegments]
    out_specs = [sp.q_grad(), sp.q_grad()]
    out_shape = [jax.ShapeDtypeStruct((B, T, Hv, K), grad_dtype)] * 2
    if g is not None and g.ndim == 4:
        out_specs.append(sp.g(4))
        out_shape.append(jax.ShapeDtypeStruct((B, T, Hv, K), f32))
    elif g is not None:
        out_specs.append(
            pl.BlockSpec(
                (None, None, plan.chunk, None),
                lambda x, c, bh: (x, plan.heads(bh)[0], c, plan.heads(bh)[1]),
            )
        )
        out_shape.append(jax.ShapeDtypeStruct((nk, B, T, Hv), f32))
    out = pl.pallas_call(
        functools.partial(_dqk_kernel, plan=plan),
        grid=(nk, plan.chunks, B * Hv),
        in_specs=specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=plan.compiler_params("dqk"),
        interpret=plan.interpret,
        name="linear_attention_chunk_dqk",
    )(*args)
    dq, dk = out[0], out[1]
    return dq, dk, (out[2] if g is not None else None)
