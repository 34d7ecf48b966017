"""The flash-attention forward kernel (Pallas Mosaic TPU).

Grid ``(B, H, T/bq, nkv)`` with semantics (parallel, parallel, parallel, arbitrary): the
online softmax of one query block walks the visible KV blocks (``blocks.kv_block``); row
statistics live as ``[bq, 128]`` lane-broadcast scratch and the lse leaves the kernel
lane-dense as ``[B, H, 1, T]`` (one ``[bq,128] -> [128,bq]`` transpose per query block).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from seqmix.kernels.attention.tpu.blocks import (
    LANES,
    NN,
    NT,
    SUBLANES,
    Cfg,
    cap,
    compiler_params,
    interpret_params,
    kv_block,
    kv_steps,
    needs_mask,
    visible,
    when_masked,
)


def _fwd_kernel(*refs, c: Cfg, nkv: int):
    if c.has_seg:
        q_ref, k_ref, v_ref, sq_ref, sk_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc, hit_sc = refs
    else:
        q_ref, k_ref, v_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc, hit_sc = refs
    i, jj = pl.program_id(2), pl.program_id(3)
    j, run = kv_block(i, jj, c)

    @pl.when(jj == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)
        hit_sc[...] = jnp.zeros(hit_sc.shape, jnp.float32)

    def step(masked: bool):
        q, k, v = q_ref[...], k_ref[...], v_ref[...]
        s = lax.dot_general(q, k, NT, precision=c.precision, preferred_element_type=jnp.float32)
        s = cap(s * c.scale, c)
        if masked:
            seg = {}
            if c.has_seg:
                seg = dict(q_seg=jnp.tile(sq_ref[...], (1, c.bk // LANES)), k_seg=sk_ref[0:1, :])
            mask = visible(i * c.bq, j * c.bk, s.shape, c, keys_on_rows=False, **seg)
            s = jnp.where(mask, s, -jnp.inf)
            # a value that is not finite at a key masked for some rows: p = 0 times it is
            # NaN, so it is zeroed, and the rows that attend it are marked (their output is
            # NaN); only the blocks that need a mask pay for this
            finite = jnp.abs(v.astype(jnp.float32)) < jnp.inf  # [bk, Dp]
            v = jnp.where(finite, v, jnp.zeros_like(v))
            bf = jnp.bfloat16  # 0/1 operands are exact in bf16: one MXU pass, as p @ v
            seen_bad = lax.dot_general(
                jnp.where(mask, 1.0, 0.0).astype(bf),
                jnp.where(finite, 0.0, 1.0).astype(bf),
                NN,
                preferred_element_type=jnp.float32,
            )  # [bq, Dp]: > 0 where a row attends a non-finite value
            hit = jnp.max(seen_bad, axis=1, keepdims=True)
            hit_sc[...] = jnp.maximum(hit_sc[...], jnp.broadcast_to(hit, hit_sc.shape))
        m_prev, l_prev = m_sc[...], l_sc[...]
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1)[:, None])  # [bq, 128]
        # a fully masked row keeps m = -inf: shift by 0 so exp gives 0, not NaN
        m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new) if masked else m_new
        p = jnp.exp(s - jnp.tile(m_use, (1, c.bk // LANES)))
        alpha = jnp.exp(m_prev - m_use)
        l_sc[...] = alpha * l_prev + jnp.sum(p, axis=1)[:, None]
        m_sc[...] = m_new
        pv = lax.dot_general(
            p.astype(v.dtype), v, NN, precision=c.precision, preferred_element_type=jnp.float32
        )
        acc_sc[...] = acc_sc[...] * jnp.tile(alpha, (1, c.Dp // LANES)) + pv

    when_masked(run, needs_mask(i, j, c), step)

    @pl.when(jj == nkv - 1)
    def _finish():
        l, m = l_sc[...], m_sc[...]
        inv = jnp.where(l == 0.0, 0.0, 1.0 / l)
        o = acc_sc[...] * jnp.tile(inv, (1, c.Dp // LANES))
        o = jnp.where(jnp.tile(hit_sc[...], (1, c.Dp // LANES)) > 0, jnp.nan, o)
        o_ref[...] = o.astype(o_ref.dtype)
        lse = jnp.where(l == 0.0, -jnp.inf, m + jnp.log(l))  # [bq, 128], equal lanes
        lse_ref[...] = lse.T[0:1, :]  # lane-dense [1, bq]


def seg_arrays(q_ids, kv_ids, c: Cfg):
    """Segment ids in the kernels' layouts, ``(q_col, k_row, q_row, k_col)``: as columns
    ``[B, L, 128]`` (one id per row, broadcast on lanes) and rows ``[B, 8, L]`` (L the longer
    padded side; padding gets id -1). The forward and dQ read the queries' as columns and
    the keys' as rows, dK/dV (keys on rows) the other two. ``kv_ids`` None (self-attention):
    the keys' ids are the queries', and each layout is built once."""
    L = max(c.Tp, c.Sp)

    def layouts(ids):
        ids = jnp.pad(ids.astype(jnp.int32), ((0, 0), (0, L - ids.shape[1])), constant_values=-1)
        col = lax.broadcast_in_dim(ids, (c.B, L, LANES), (0, 1))
        row = lax.broadcast_in_dim(ids, (c.B, SUBLANES, L), (0, 2))
        return col, row

    q_col, q_row = layouts(q_ids)
    k_col, k_row = (q_col, q_row) if kv_ids is None else layouts(kv_ids)
    return q_col, k_row, q_row, k_col


def forward(qk, kk, vk, seg, c: Cfg):
    """Kernel-layout forward: qk [B,Tp,H*Dp], kk/vk [B,Sp,Hkv*Dp] ->
    o [B,Tp,H*Dp], lse [B,H,1,Tp] (float32)."""
    nkv = kv_steps(c)
    G = c.G

    def q_map(b, h, i, jj):
        return b, i, h

    def kv_map(b, h, i, jj):
        return b, kv_block(i, jj, c)[0], h // G

    in_specs = [
        pl.BlockSpec((None, c.bq, c.Dp), q_map),
        pl.BlockSpec((None, c.bk, c.Dp), kv_map),
        pl.BlockSpec((None, c.bk, c.Dp), kv_map),
    ]
    args = [qk, kk, vk]
    if c.has_seg:
        col, row = seg[:2]
        in_specs += [
            pl.BlockSpec((None, c.bq, LANES), lambda b, h, i, jj: (b, i, 0)),
            pl.BlockSpec((None, SUBLANES, c.bk), lambda b, h, i, jj: (b, 0, kv_block(i, jj, c)[0])),
        ]
        args += [col, row]
    visible_frac = nkv / c.nk
    flops = 4 * c.B * c.H * c.Tp * c.Sp * c.Dp * visible_frac
    itemsize = jnp.dtype(c.compute_dtype).itemsize
    o, lse = pl.pallas_call(
        functools.partial(_fwd_kernel, c=c, nkv=nkv),
        grid=(c.B, c.H, c.nq, nkv),
        in_specs=in_specs,
        out_specs=[
            pl.BlockSpec((None, c.bq, c.Dp), q_map),
            pl.BlockSpec((None, None, 1, c.bq), lambda b, h, i, jj: (b, h, 0, i)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((c.B, c.Tp, c.H * c.Dp), jnp.dtype(c.compute_dtype)),
            jax.ShapeDtypeStruct((c.B, c.H, 1, c.Tp), jnp.float32),
        ],
        scratch_shapes=[
            pltpu.VMEM((c.bq, LANES), jnp.float32),
            pltpu.VMEM((c.bq, LANES), jnp.float32),
            pltpu.VMEM((c.bq, c.Dp), jnp.float32),
            pltpu.VMEM((c.bq, LANES), jnp.float32),
        ],
        compiler_params=compiler_params(("parallel", "parallel", "parallel", "arbitrary")),
        cost_estimate=pl.CostEstimate(
            flops=int(flops),
            transcendentals=int(flops / (4 * c.Dp)),
            bytes_accessed=int(itemsize * c.B * c.H * c.Dp * (2 * c.Tp + 2 * c.nq * nkv * c.bk)),
        ),
        interpret=interpret_params(c),
        name="seqmix_flash_fwd",
    )(*args)
    return o, lse
