"""Attention between two different blocks of a packed sequence, in XLA.

``seqmix.kernels.attention`` masks packed segments only in self-attention (one
``segment_ids`` array for queries and keys). A query block of one device against a key block
of another needs a query id array and a key id array; this module computes that case:

    o = softmax(scale * q k^T + mask) v,   mask[t, s] = 0 if q_ids[t] == kv_ids[s] else -inf

with every other key visible (the context-parallel attention calls it only for key blocks
entirely in the queries' past), returning the log-sum-exp for merging. Keys are visited in
blocks with an online softmax; the backward recomputes each block's probabilities from the
saved log-sum-exp (flash attention's scheme), so memory grows with ``T * block_k``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array


def segment_attention(
    q: Array,
    k: Array,
    v: Array,
    q_segment_ids: Array,
    kv_segment_ids: Array,
    *,
    scale: float,
    softcap: float | None = None,
    block_k: int = 512,
) -> tuple[Array, Array]:
    """Attention of ``q [B, T, H, D]`` over ``k, v [B, S, Hkv, D]`` (GQA: query head ``h``
    reads KV head ``h // (H // Hkv)``) where query ``t`` sees key ``s`` iff
    ``q_segment_ids[b, t] == kv_segment_ids[b, s]``; ``softcap`` caps logits as
    ``c * tanh(s / c)``.

    Returns ``(o [B, T, H, D] in q's dtype, lse [B, T, H] float32)``; a query that sees no
    key gets ``o = 0`` and ``lse = -inf``.
    """
    return _attention(q, k, v, q_segment_ids, kv_segment_ids, scale, softcap, block_k)


def _operands(q):
    """Matmul operand dtype and precision: float32 inputs stay exact (HIGHEST); bf16/fp16
    multiply in their own dtype with float32 accumulation."""
    if q.dtype == jnp.float32:
        return jnp.float32, lax.Precision.HIGHEST
    return q.dtype, None


def _key_blocks(x, block):
    """``[B, S, ...]`` -> ``[n, B, block, ...]``, zero-padded."""
    S = x.shape[1]
    n = -(-S // block)
    x = jnp.pad(x, [(0, 0), (0, n * block - S)] + [(0, 0)] * (x.ndim - 2))
    return jnp.moveaxis(x.reshape(x.shape[0], n, block, *x.shape[2:]), 1, 0)


def _logits(qg, kb, q_ids, kb_ids, kb_valid, scale, softcap, dtype, precision):
    """Capped logits ``[B, Hkv, G, T, bk]``, raw logits and the visibility mask."""
    s_raw = (
        jnp.einsum(
            "btkgd,bskd->bkgts",
            qg.astype(dtype),
            kb.astype(dtype),
            precision=precision,
            preferred_element_type=jnp.float32,
        )
        * scale
    )
    s = s_raw if softcap is None else softcap * jnp.tanh(s_raw / softcap)
    mask = (q_ids[:, :, None] == kb_ids[:, None, :]) & kb_valid[None, None, :]  # [B, T, bk]
    return s, s_raw, mask[:, None, None]


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _attention(q, k, v, q_ids, kv_ids, scale, softcap, block_k):
    return _forward(q, k, v, q_ids, kv_ids, scale, softcap, block_k)[0]


def _forward(q, k, v, q_ids, kv_ids, scale, softcap, block_k):
    B, T, H, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    G = H // Hkv
    bk = max(1, min(block_k, S))
    dtype, precision = _operands(q)
    qg = q.reshape(B, T, Hkv, G, D)
    valid = _key_blocks(jnp.ones((1, S), bool), bk)[:, 0]  # [n, bk]

    def body(carry, xs):
        o, m, l = carry
        kb, vb, idb, okb = xs
        s, _, mask = _logits(qg, kb, q_ids, idb, okb, scale, softcap, dtype, precision)
        s = jnp.where(mask, s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        p = jnp.exp(s - m_safe[..., None])
        corr = jnp.exp(m - m_safe)
        l = l * corr + jnp.sum(p, axis=-1)
        pv = jnp.einsum(
            "bkgts,bskd->bkgtd",
            p.astype(dtype),
            vb.astype(dtype),
            precision=precision,
            preferred_element_type=jnp.float32,
        )
        return (o * corr[..., None] + pv, m_new, l), None

    init = (
        jnp.zeros((B, Hkv, G, T, D), jnp.float32),
        jnp.full((B, Hkv, G, T), -jnp.inf, jnp.float32),
        jnp.zeros((B, Hkv, G, T), jnp.float32),
    )
    xs = (_key_blocks(k, bk), _key_blocks(v, bk), _key_blocks(kv_ids, bk), valid)
    (o, m, l), _ = lax.scan(body, init, xs)
    seen = l > 0
    o = o / jnp.where(seen, l, 1.0)[..., None]
    lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), -jnp.inf)
    o = jnp.transpose(o, (0, 3, 1, 2, 4)).reshape(B, T, H, D).astype(q.dtype)
    lse = jnp.transpose(lse, (0, 3, 1, 2)).reshape(B, T, H)
    return (o, lse), (q, k, v, q_ids, kv_ids, o, lse)


def _backward(scale, softcap, block_k, res, cts):
    q, k, v, q_ids, kv_ids, o, lse = res
    do, dlse = cts
    B, T, H, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    G = H // Hkv
    bk = max(1, min(block_k, S))
    dtype, precision = _operands(q)
    qg = q.reshape(B, T, Hkv, G, D)
    dog = do.reshape(B, T, Hkv, G, D)

    def per_head(x):  # [B, T, H] -> [B, Hkv, G, T]
        return jnp.transpose(x.reshape(B, T, Hkv, G), (0, 2, 3, 1))

    lse_h = per_head(lse)
    lse_safe = jnp.where(jnp.isfinite(lse_h), lse_h, 0.0)
    delta = per_head(jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1))
    delta = delta - per_head(dlse.astype(jnp.float32))
    valid = _key_blocks(jnp.ones((1, S), bool), bk)[:, 0]

    def mm(spec, a, b):
        return jnp.einsum(
            spec,
            a.astype(dtype),
            b.astype(dtype),
            precision=precision,
            preferred_element_type=jnp.float32,
        )

    def body(dq, xs):
        kb, vb, idb, okb = xs
        s, s_raw, mask = _logits(qg, kb, q_ids, idb, okb, scale, softcap, dtype, precision)
        p = jnp.where(mask, jnp.exp(s - lse_safe[..., None]), 0.0)
        dv = mm("bkgts,btkgd->bskd", p, dog)
        dp = mm("btkgd,bskd->bkgts", dog, vb)
        ds = p * (dp - delta[..., None])
        if softcap is not None:
            ds = ds * (1.0 - jnp.tanh(s_raw / softcap) ** 2)
        ds = ds * scale
        dq = dq + mm("bkgts,bskd->btkgd", ds, kb)
        dk = mm("bkgts,btkgd->bskd", ds, qg)
        return dq, (dk, dv)

    xs = (_key_blocks(k, bk), _key_blocks(v, bk), _key_blocks(kv_ids, bk), valid)
    dq, (dk, dv) = lax.scan(body, jnp.zeros((B, T, Hkv, G, D), jnp.float32), xs)

    def unblock(x):
        return jnp.moveaxis(x, 0, 1).reshape(B, -1, Hkv, D)[:, :S]

    return (
        dq.reshape(B, T, H, D).astype(q.dtype),
        unblock(dk).astype(k.dtype),
        unblock(dv).astype(v.dtype),
        None,
        None,
    )


_attention.defvjp(_forward, _backward)
