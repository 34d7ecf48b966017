"""The flash-attention forward kernel (Pallas Triton).

FlashAttention-2: one program per ``(query block, batch, head)``; the query tile stays in
registers while K/V tiles stream through an online softmax in the exp2 domain, over the key
blocks ``blocks.key_blocks`` leaves visible. It writes ``o`` and the log2-domain lse
(``+inf`` for a row that sees no key).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from seqmix.kernels.attention.triton.blocks import key_blocks, loops, segment_ranges


def _fwd_kernel(q_ref, k_ref, v_ref, *refs, st, nq, nk):
    if st.segments:
        qseg_ref, kseg_ref, lo_ref, hi_ref, o_ref, lse_ref = refs
    else:
        o_ref, lse_ref = refs
    bq, bk = st.fwd.block_q, st.fwd.block_k
    i = pl.program_id(0)
    i = nq - 1 - i if st.reversed_q() else i
    q0 = i * bq
    q = q_ref[...]
    qpos = q0 + jnp.arange(bq, dtype=jnp.int32)
    qseg = qseg_ref[...][:, None] if st.segments else None

    def step(j, carry, masked):
        acc, m, l, hit = carry
        k0 = pl.multiple_of(j * bk, bk)
        k = k_ref[pl.ds(k0, bk), :]
        v = v_ref[pl.ds(k0, bk), :]
        s, _ = st.logits2(st.dot(q, k, trans_b=True))  # [bq, bk]
        if masked:
            kpos = k0 + jnp.arange(bk, dtype=jnp.int32)
            kseg = kseg_ref[pl.ds(k0, bk)][None, :] if st.segments else None
            vis = st.mask(qpos[:, None] - kpos[None, :], kpos[None, :], qseg, kseg)
            s = jnp.where(vis, s, -jnp.inf)
            # a key masked for some rows of this tile may hold NaN / Inf in v, and p = 0
            # times it is NaN: zero such keys' rows, and mark the rows that do attend one
            # (only boundary tiles pay for this; in the others every row attends every key)
            bad = jnp.max(jnp.where(jnp.abs(v.astype(jnp.float32)) < jnp.inf, 0.0, 1.0), axis=1)
            v = jnp.where(bad[:, None] > 0, jnp.zeros_like(v), v)
            hit = jnp.maximum(hit, jnp.max(jnp.where(vis, bad[None, :], 0.0), axis=1))
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        # a row that has seen no key yet keeps m = -inf: shift by 0 so exp2 gives 0, not NaN
        m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new) if masked else m_new
        corr = jnp.exp2(m - m_use)
        p = jnp.exp2(s - m_use[:, None])
        l = l * corr + jnp.sum(p, axis=1)
        acc = acc * corr[:, None] + st.dot(p.astype(v.dtype), v)
        return acc, m_new, l, hit

    lo, hi, flo, fhi = key_blocks(q0, bq, bk, nk, st)
    if st.segments:
        lo, hi = jnp.maximum(lo, lo_ref[i]), jnp.minimum(hi, hi_ref[i])
    init = (
        jnp.zeros((bq, q.shape[-1]), jnp.float32),
        jnp.full((bq,), -jnp.inf, jnp.float32),
        jnp.zeros((bq,), jnp.float32),
        jnp.zeros((bq,), jnp.float32),  # 1 where a row attended a key whose value is not finite
    )
    acc, m, l, hit = loops(lo, hi, flo, fhi, step, init, st, head=st.left is not None)
    seen = l > 0
    l_safe = jnp.where(seen, l, 1.0)
    o = jnp.where(hit[:, None] > 0, jnp.nan, acc / l_safe[:, None])
    plgpu.store(o_ref, o.astype(o_ref.dtype))
    # log2-domain lse; +inf marks a row that sees no key (its p is 0 in the backward)
    plgpu.store(lse_ref, jnp.where(seen, m + jnp.log2(l_safe), jnp.inf))


def forward(q, k, v, qseg, kseg, st):
    B, T, H, D = q.shape
    S = k.shape[1]
    G = st.groups
    bq, bk = st.fwd.block_q, st.fwd.block_k
    nq, nk = T // bq, S // bk
    qi = (lambda i: nq - 1 - i) if st.reversed_q() else (lambda i: i)
    in_specs = [
        pl.BlockSpec((None, bq, None, D), lambda i, b, h: (b, qi(i), h, 0)),
        pl.BlockSpec((None, S, None, D), lambda i, b, h: (b, 0, h // G, 0)),
        pl.BlockSpec((None, S, None, D), lambda i, b, h: (b, 0, h // G, 0)),
    ]
    args = [q, k, v]
    if st.segments:
        lo, hi = segment_ranges(qseg, kseg, bq, bk)
        in_specs += [
            pl.BlockSpec((None, bq), lambda i, b, h: (b, qi(i))),
            pl.BlockSpec((None, S), lambda i, b, h: (b, 0)),
            pl.BlockSpec((None, nq), lambda i, b, h: (b, 0)),
            pl.BlockSpec((None, nq), lambda i, b, h: (b, 0)),
        ]
        args += [qseg, kseg, lo, hi]
    return pl.pallas_call(
        functools.partial(_fwd_kernel, st=st, nq=nq, nk=nk),
        grid=(nq, B, H),
        in_specs=in_specs,
        out_specs=[
            pl.BlockSpec((None, bq, None, D), lambda i, b, h: (b, qi(i), h, 0)),
            pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, qi(i))),
        ],
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((B, H, T), jnp.float32),
        ],
        compiler_params=plgpu.CompilerParams(
            num_warps=st.fwd.num_warps, num_stages=st.fwd.num_stages
        ),
        interpret=st.interpret,
        name="seqmix_flash_fwd",
    )(*args)
