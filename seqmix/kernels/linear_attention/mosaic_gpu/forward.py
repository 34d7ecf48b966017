"""Every chunk's output, all chunks in parallel.

For a token ``t`` of chunk ``c`` (``b`` the inclusive cumulative log decay in the chunk,
``S_c`` the state entering it, from ``state.state_pass``):

    o_t = scale * ( u_t (q_t^T S_c) + sum_{s <= t, run_s = run_t} (q_t . k_s) exp(b_t - b_s) v_s )

with ``u_t = exp(b_t) [run_t = run_prev]``. One program per (group of chunks, batch * v
head, value block) walks its chunks through a TMA pipeline; per chunk three wgmmas with
``M = C = 64``: the scores ``q k^T`` (``[C, C]``, contraction over K), the state term ``q
S_c`` and the intra-chunk term ``P v`` with ``P`` the decayed, masked scores staged in SMEM
(as ``hi + lo`` halves with ``split_scores``). Per-channel decays are handled by
``channel.py``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from seqmix.kernels.linear_attention.mosaic_gpu import common as cm
from seqmix.kernels.linear_attention.mosaic_gpu.plan import Plan

F32 = jnp.float32


def intra_decay(plan: Plan, b_ref, m_ref, *, transpose: bool = False):
    """The ``[C, C]`` factor of the intra-chunk scores of one chunk: ``exp(b_t - b_s)``
    over the allowed pairs (``s <= t``, same run), 0 elsewhere; rows are ``t`` (columns
    with ``transpose``). ``b_ref`` ``[C]`` (None without decay), ``m_ref`` ``[3, C]``
    (None without runs). Returns a bool mask instead of a float factor when there is no
    decay."""
    C = plan.chunk
    shape = (C, C)
    r, c = cm.iota(shape, 0), cm.iota(shape, 1)
    mask = (r <= c) if transpose else (r >= c)
    if m_ref is not None:
        run_r = plgpu.load(m_ref.at[2], layout=cm.ROW)
        run_c = plgpu.load(m_ref.at[2], layout=cm.COL)
        mask = mask & (cm.rows(run_r, shape) == cm.cols(run_c, shape))
    if b_ref is None:
        return mask
    b_r = plgpu.load(b_ref, layout=cm.ROW)
    b_c = plgpu.load(b_ref, layout=cm.COL)
    diff = cm.rows(b_r, shape) - cm.cols(b_c, shape)
    if transpose:
        diff = -diff
    return jnp.exp(jnp.where(mask, diff, -jnp.inf))


def apply_intra(scores, factor):
    """Scores times ``intra_decay``'s factor (or masked by its bool mask)."""
    if factor.dtype == jnp.bool_:
        return jnp.where(factor, scores, 0.0)
    return scores * factor


def _output_kernel(q_ref, k_ref, v_ref, st_ref, *refs, plan: Plan, **s):
    it = iter(refs)
    b_ref = next(it) if plan.decay == "scalar" else None
    m_ref = next(it) if plan.has_runs else None
    o_ref = next(it)
    C, BV, G = plan.chunk, plan.block_v, plan.chunks_per_program
    dtype = jnp.dtype(plan.dtype)
    cg, bh, vb = lax.axis_index("cg"), lax.axis_index("bh"), lax.axis_index("vb")
    bi, h, hq = plan.heads(bh)
    vcols = pl.ds(vb * BV, BV)

    def fetch(i, slot, barrier):
        c = cg * G + i
        t = pl.ds(c * C, C)
        plgpu.copy_gmem_to_smem(q_ref.at[bi, t, hq], s["q"].at[slot], barrier)
        plgpu.copy_gmem_to_smem(k_ref.at[bi, t, hq], s["k"].at[slot], barrier)
        plgpu.copy_gmem_to_smem(v_ref.at[bi, t, h, vcols], s["v"].at[slot], barrier)
        plgpu.copy_gmem_to_smem(st_ref.at[bi, h, c, :, vcols], s["st"].at[slot], barrier)
        if b_ref is not None:
            plgpu.copy_gmem_to_smem(b_ref.at[bi, h, t], s["b"].at[slot], barrier)
        if m_ref is not None:
            plgpu.copy_gmem_to_smem(m_ref.at[bi, :, t], s["m"].at[slot], barrier)

    def body(i, slot, carry):
        q_s, k_s, v_s = s["q"].at[slot], s["k"].at[slot], s["v"].at[slot]
        b_s = None if b_ref is None else s["b"].at[slot]
        m_s = None if m_ref is None else s["m"].at[slot]
        scores = cm.matmul((C, C), (q_s, k_s.T))
        P = apply_intra(scores, intra_decay(plan, b_s, m_s))
        cm.store_split(P, s["p"], s.get("p_lo"))
        plgpu.commit_smem()
        o = cm.matmul((C, BV), (q_s, s["st"].at[slot]))
        u = None
        if b_s is not None:
            u = jnp.exp(plgpu.load(b_s, layout=cm.ROW))
        if m_s is not None:
            keep = plgpu.load(m_s.at[0], layout=cm.ROW)
            u = keep if u is None else u * keep
        if u is not None:
            o = o * cm.rows(u, (C, BV))
        pairs = [(s["p"], v_s)] + ([(s["p_lo"], v_s)] if "p_lo" in s else [])
        o = o + cm.matmul((C, BV), *pairs)
        ob = lax.rem(i, 2)
        cm.before_staging(2)
        s["out"][ob] = (plan.scale * o).astype(dtype)
        t = pl.ds((cg * G + i) * C, C)
        cm.write_out([(s["out"].at[ob], o_ref.at[bi, t, h, vcols])])
        return carry

    cm.pipeline(steps=G, depth=plan.depth, barriers=s["bars"], fetch=fetch, body=body)
    cm.finish_writes()


def chunk_output(plan: Plan, q, k, v, states, b, masks):
    """``o [B, T, Hv, V]`` in q's dtype from padded inputs and the chunk states ``[B, Hv,
    n, K, V]``; ``b`` scalar ``[B, Hv, T]`` or None, ``masks [B, 3, T]`` or None."""
    B, T, H, V = plan.batch, plan.time, plan.v_heads, plan.value_dim
    C, K, BV, D = plan.chunk, plan.key_dim, plan.block_v, plan.depth
    dtype = jnp.dtype(plan.dtype)
    args = [q, k, v, states]
    copies = 4
    scratch = {
        "q": cm.tile((D, C, K), dtype),
        "k": cm.tile((D, C, K), dtype),
        "v": cm.tile((D, C, BV), dtype),
        "st": cm.tile((D, K, BV), dtype),
        "p": cm.tile((C, C), dtype),
        "out": cm.tile((2, C, BV), dtype),
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
        functools.partial(_output_kernel, plan=plan),
        out_type=jax.ShapeDtypeStruct((B, T, H, V), dtype),
        grid=(plan.chunks // plan.chunks_per_program, B * H, V // BV),
        grid_names=("cg", "bh", "vb"),
        scratch=scratch,
        interpret=plan.interpret,
        name="linear_attention_output",
    )(*args)
