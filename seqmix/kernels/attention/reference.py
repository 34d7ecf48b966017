"""Softmax attention in plain XLA: the oracle (``naive``) and a memory-efficient form (``xla``).

Both take normalised arguments (see ``api.attention``): ``window = (left, right)`` with
``None`` for an unbounded side, and return ``(o, lse)``: ``o [B, T, H, D]`` in q's dtype and
``lse [B, T, H]`` float32, the natural log-sum-exp of the (scaled, soft-capped) visible
logits. A query row that sees no key gets ``o = 0`` and ``lse = -inf``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from seqmix.kernels.checks import accum_dtype

Window = tuple[int | None, int | None]


def visible(
    q_pos: jax.Array,
    k_pos: jax.Array,
    *,
    causal: bool,
    window: Window,
    q_segment_ids: jax.Array | None = None,
    k_segment_ids: jax.Array | None = None,
) -> jax.Array:
    """Which keys each query sees: a boolean ``[..., Tq, Tk]`` mask.

    ``q_pos [Tq]`` and ``k_pos [Tk]`` are positions; segment ids, when given, are
    ``[B, Tq]`` and ``[B, Tk]`` and add a leading batch axis to the mask.
    """
    diff = q_pos[:, None] - k_pos[None, :]  # query position minus key position
    mask = jnp.ones(diff.shape, dtype=bool)
    left, right = window
    if causal:
        mask &= diff >= 0
    if left is not None:
        mask &= diff <= left
    if right is not None:
        mask &= diff >= -right
    if q_segment_ids is not None:
        mask = mask[None] & (q_segment_ids[:, :, None] == k_segment_ids[:, None, :])
    return mask


def cap_logits(s: jax.Array, softcap: float | None) -> jax.Array:
    """``softcap * tanh(s / softcap)``, or ``s`` without a softcap."""
    return s if softcap is None else softcap * jnp.tanh(s / softcap)


def nonfinite_keys(v):
    """``(bad [..., S, Hkv], v with those keys' rows zeroed)``: a key whose value row holds a
    NaN or Inf. A masked key's probability is 0, but 0 times NaN is NaN in ``p @ v``, so
    every implementation multiplies by the zeroed rows and marks the queries that attend a
    bad key (their output is NaN): a value at a masked key never reaches an output."""
    bad = jnp.logical_not(jnp.all(jnp.isfinite(v), axis=-1))
    return bad, jnp.where(bad[..., None], jnp.zeros((), v.dtype), v)


def attention_naive(q, k, v, *, causal, window, segment_ids, softcap, scale, kv_segment_ids=None):
    """Dense masked softmax attention, float32 (float64 for float64 inputs) inside."""
    acc = accum_dtype(q.dtype)
    B, T, H, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    G = H // Hkv
    qf = q.astype(acc).reshape(B, T, Hkv, G, D)
    s = jnp.einsum("btkgd,bskd->bkgts", qf, k.astype(acc)) * scale
    s = cap_logits(s, softcap)
    mask = visible(
        jnp.arange(T),
        jnp.arange(S),
        causal=causal,
        window=window,
        q_segment_ids=segment_ids,
        k_segment_ids=segment_ids if kv_segment_ids is None else kv_segment_ids,
    )
    mask = mask[:, None, None] if mask.ndim == 3 else mask[None, None, None]
    s = jnp.where(mask, s, -jnp.inf)
    m = lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(s - m)
    l = jnp.sum(p, axis=-1, keepdims=True)
    bad, v = nonfinite_keys(v)
    hit = jnp.any(mask & jnp.transpose(bad, (0, 2, 1))[:, :, None, None, :], axis=-1)
    o = jnp.einsum("bkgts,bskd->btkgd", p / jnp.where(l > 0, l, 1.0), v.astype(acc))
    o = jnp.where(jnp.transpose(hit, (0, 3, 1, 2))[..., None], jnp.nan, o)
    lse = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), -jnp.inf)[..., 0]
    lse = jnp.transpose(lse, (0, 3, 1, 2)).reshape(B, T, H)
    return o.reshape(B, T, H, D).astype(q.dtype), lse.astype(acc)


# --- memory-efficient XLA form: key blocks with an online softmax, flash backward ---------


def _blocks(x, block, axis=1):
    """[B, S, ...] -> [nblocks, B, block, ...], zero-padded along ``axis``."""
    S = x.shape[axis]
    n = -(-S // block)
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, n * block - S)
    x = jnp.pad(x, pad)
    x = x.reshape(x.shape[:axis] + (n, block) + x.shape[axis + 1 :])
    return jnp.moveaxis(x, axis, 0)


def _key_positions(S, block):
    """Positions of the keys of each block, [nblocks, block]; padding gets positions >= S."""
    n = -(-S // block)
    return jnp.arange(n * block).reshape(n, block)


def _block_logits(qf, kb, kpos, qpos, q_seg, kseg, *, causal, window, softcap, scale, S):
    """Scaled, capped logits of one key block and its mask: s [B,Hkv,G,T,bk], mask."""
    s_raw = jnp.einsum("btkgd,bskd->bkgts", qf, kb.astype(qf.dtype)) * scale
    s = cap_logits(s_raw, softcap)
    mask = visible(
        qpos, kpos, causal=causal, window=window, q_segment_ids=q_seg, k_segment_ids=kseg
    )
    mask = mask & (kpos < S)[None, :] if mask.ndim == 2 else mask & (kpos < S)[None, None, :]
    mask = mask[:, None, None] if mask.ndim == 3 else mask[None, None, None]
    return s, s_raw, mask


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8, 9))
def _attention_xla(q, k, v, segment_ids, kv_segment_ids, causal, window, softcap, scale, block_k):
    return _attention_xla_fwd(
        q, k, v, segment_ids, kv_segment_ids, causal, window, softcap, scale, block_k
    )[0]


def _attention_xla_fwd(
    q, k, v, segment_ids, kv_segment_ids, causal, window, softcap, scale, block_k
):
    acc = accum_dtype(q.dtype)
    B, T, H, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    G = H // Hkv
    bk = min(block_k, S)
    qf = q.astype(acc).reshape(B, T, Hkv, G, D)
    qpos = jnp.arange(T)
    kpos_blocks = _key_positions(S, bk)
    seg_blocks = None if kv_segment_ids is None else _blocks(kv_segment_ids, bk)

    def body(carry, xs):
        o, m, l, hit = carry
        kb, vb, kpos, kseg = xs
        s, _, mask = _block_logits(
            qf,
            kb,
            kpos,
            qpos,
            segment_ids,
            kseg,
            causal=causal,
            window=window,
            softcap=softcap,
            scale=scale,
            S=S,
        )
        s = jnp.where(mask, s, -jnp.inf)
        m_new = lax.stop_gradient(jnp.maximum(m, jnp.max(s, axis=-1)))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        corr = jnp.exp(m - m_safe)
        p = jnp.exp(s - m_safe[..., None])
        l = l * corr + jnp.sum(p, axis=-1)
        bad, vb = nonfinite_keys(vb)
        hit = hit | jnp.any(mask & jnp.transpose(bad, (0, 2, 1))[:, :, None, None, :], axis=-1)
        o = o * corr[..., None] + jnp.einsum("bkgts,bskd->bkgtd", p, vb.astype(acc))
        return (o, m_new, l, hit), None

    init = (
        jnp.zeros((B, Hkv, G, T, D), acc),
        jnp.full((B, Hkv, G, T), -jnp.inf, acc),
        jnp.zeros((B, Hkv, G, T), acc),
        jnp.zeros((B, Hkv, G, T), bool),
    )
    xs = (_blocks(k, bk), _blocks(v, bk), kpos_blocks, seg_blocks)
    (o, m, l, hit), _ = lax.scan(body, init, xs)
    o = jnp.where(hit[..., None], jnp.nan, o / jnp.where(l > 0, l, 1.0)[..., None])
    lse = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), -jnp.inf)
    o = jnp.transpose(o, (0, 3, 1, 2, 4)).reshape(B, T, H, D).astype(q.dtype)
    lse = jnp.transpose(lse, (0, 3, 1, 2)).reshape(B, T, H)
    return (o, lse), (q, k, v, segment_ids, kv_segment_ids, o, lse, hit)


def _attention_xla_bwd(causal, window, softcap, scale, block_k, res, cts):
    q, k, v, segment_ids, kv_segment_ids, o, lse, hit = res
    do, dlse = cts
    acc = accum_dtype(q.dtype)
    B, T, H, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    G = H // Hkv
    bk = min(block_k, S)
    # The rows that attend a non-finite value are NaN by a where (as in the naive form): no
    # gradient flows through them, and the bad values are zeroed as in the forward, so a
    # value at a masked key reaches no gradient either.
    hit = jnp.transpose(hit, (0, 3, 1, 2)).reshape(B, T, H, 1)
    do = jnp.where(hit, jnp.zeros((), do.dtype), do)
    o = jnp.where(hit, jnp.zeros((), o.dtype), o)
    to_bkgt = lambda x: jnp.transpose(
        x.reshape(B, T, Hkv, G, *x.shape[3:]), (0, 2, 3, 1) + tuple(range(4, x.ndim + 1))
    )
    qf = q.astype(acc).reshape(B, T, Hkv, G, D)
    dof = do.astype(acc).reshape(B, T, Hkv, G, D)
    lse_k = to_bkgt(lse)  # [B,Hkv,G,T]
    lse_safe = jnp.where(jnp.isfinite(lse_k), lse_k, 0.0)
    delta = to_bkgt(jnp.sum(do.astype(acc) * o.astype(acc), axis=-1))
    dlse_k = jnp.zeros_like(lse_k) if dlse is None else to_bkgt(dlse.astype(acc))
    qpos = jnp.arange(T)

    def body(dq, xs):
        kb, vb, kpos, kseg = xs
        s, s_raw, mask = _block_logits(
            qf,
            kb,
            kpos,
            qpos,
            segment_ids,
            kseg,
            causal=causal,
            window=window,
            softcap=softcap,
            scale=scale,
            S=S,
        )
        p = jnp.where(mask, jnp.exp(s - lse_safe[..., None]), 0.0)
        vb = nonfinite_keys(vb)[1]
        dv = jnp.einsum("bkgts,btkgd->bskd", p, dof)
        dp = jnp.einsum("btkgd,bskd->bkgts", dof, vb.astype(acc))
        ds = p * (dp - delta[..., None] + dlse_k[..., None])
        if softcap is not None:
            ds = ds * (1.0 - jnp.tanh(s_raw / softcap) ** 2)
        ds = ds * scale
        dq = dq + jnp.einsum("bkgts,bskd->btkgd", ds, kb.astype(acc))
        dk = jnp.einsum("bkgts,btkgd->bskd", ds, qf)
        return dq, (dk, dv)

    xs = (
        _blocks(k, bk),
        _blocks(v, bk),
        _key_positions(S, bk),
        None if kv_segment_ids is None else _blocks(kv_segment_ids, bk),
    )
    dq, (dk, dv) = lax.scan(body, jnp.zeros((B, T, Hkv, G, D), acc), xs)
    unblock = lambda x: jnp.moveaxis(x, 0, 1).reshape(B, -1, Hkv, D)[:, :S]
    return (
        dq.reshape(B, T, H, D).astype(q.dtype),
        unblock(dk).astype(k.dtype),
        unblock(dv).astype(v.dtype),
        None,
        None,
    )


_attention_xla.defvjp(_attention_xla_fwd, _attention_xla_bwd)


def attention_xla(
    q, k, v, *, causal, window, segment_ids, softcap, scale, kv_segment_ids=None, block_k=512
):
    """Flash attention written in XLA: keys in blocks of ``block_k`` with an online softmax;
    the backward recomputes each block's probabilities from the saved log-sum-exp, so memory
    grows with T * block_k, never T * S. ``kv_segment_ids``: the keys' ids (default: the
    queries' ``segment_ids``)."""
    if segment_ids is not None and kv_segment_ids is None:
        kv_segment_ids = segment_ids
    return _attention_xla(
        q, k, v, segment_ids, kv_segment_ids, causal, window, softcap, scale, block_k
    )


# --- decoding --------------------------------------------------------------------------------


def live_cache(cache, lengths):
    """``cache [B, S, Hkv, D]`` with the slots at and past ``lengths[b]`` zeroed. Those slots
    get probability 0, but 0 times a NaN or Inf left there (a real cache holds stale values)
    is NaN, in the output and in dq; the one query of a row masks the same slots for every
    head, so zeroing them changes no live result."""
    live = jnp.arange(cache.shape[1])[None, :] < lengths[:, None]
    return jnp.where(live[:, :, None, None], cache, jnp.zeros((), cache.dtype))


def decode_attention_naive(q, k_cache, v_cache, lengths, *, scale, softcap):
    """One query per row over its first ``lengths[b]`` cache entries (dense, float32)."""
    k_cache, v_cache = live_cache(k_cache, lengths), live_cache(v_cache, lengths)
    acc = accum_dtype(q.dtype)
    B, H, D = q.shape
    S, Hkv = k_cache.shape[1], k_cache.shape[2]
    qf = q.astype(acc).reshape(B, Hkv, H // Hkv, D)
    s = cap_logits(jnp.einsum("bkgd,bskd->bkgs", qf, k_cache.astype(acc)) * scale, softcap)
    mask = (jnp.arange(S)[None, :] < lengths[:, None])[:, None, None, :]
    s = jnp.where(mask, s, -jnp.inf)
    m = lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(s - m)
    l = jnp.sum(p, axis=-1, keepdims=True)
    o = jnp.einsum("bkgs,bskd->bkgd", p / jnp.where(l > 0, l, 1.0), v_cache.astype(acc))
    return o.reshape(B, H, D).astype(q.dtype)


def decode_attention_xla(q, k_cache, v_cache, lengths, *, scale, softcap):
    """Decoding in XLA: the cache is read in its own dtype, logits and sums in float32."""
    k_cache, v_cache = live_cache(k_cache, lengths), live_cache(v_cache, lengths)
    B, H, D = q.shape
    S, Hkv = k_cache.shape[1], k_cache.shape[2]
    qg = q.reshape(B, Hkv, H // Hkv, D)
    # float32: full-precision products (a GPU's default would take TF32), here and in the VJP
    precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
    s = (
        jnp.einsum(
            "bkgd,bskd->bkgs",
            qg,
            k_cache.astype(q.dtype),
            preferred_element_type=jnp.float32,
            precision=precision,
        )
        * scale
    )
    s = cap_logits(s, softcap)
    mask = (jnp.arange(S)[None, :] < lengths[:, None])[:, None, None, :]
    s = jnp.where(mask, s, -jnp.inf)
    m = lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(s - m)
    l = jnp.sum(p, axis=-1, keepdims=True)
    o = jnp.einsum(
        "bkgs,bskd->bkgd",
        p.astype(v_cache.dtype),
        v_cache,
        preferred_element_type=jnp.float32,
        precision=precision,
    ) / jnp.where(l > 0, l, 1.0)
    return o.reshape(B, H, D).astype(q.dtype)


def combine_splits(o, m, l, out_dtype):
    """Log-sum-exp merge of split partials along axis 0: o [n, ..., D], m, l [n, ...]."""
    m_max = jnp.max(m, axis=0)
    m_max = jnp.where(jnp.isfinite(m_max), m_max, 0.0)  # all splits empty (length 0)
    w = jnp.exp(m - m_max[None])  # empty split: exp(-inf) = 0
    l_tot = jnp.sum(w * l, axis=0)
    o_tot = jnp.sum(w[..., None] * o, axis=0)
    return (o_tot / jnp.where(l_tot > 0, l_tot, 1.0)[..., None]).astype(out_dtype)


def with_reference_vjp(kernel_fn):
    """Wraps a forward-only decode kernel ``kernel_fn(q, k_cache, v_cache, lengths, *, scale,
    softcap, config)`` so that jax.grad uses the XLA reference's VJP; the wrapper takes
    ``(q, k_cache, v_cache, lengths, scale, softcap, config)``, the last three static."""

    @functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
    def f(q, k_cache, v_cache, lengths, scale, softcap, config):
        return kernel_fn(q, k_cache, v_cache, lengths, scale=scale, softcap=softcap, config=config)

    def fwd(q, k_cache, v_cache, lengths, scale, softcap, config):
        out = f(q, k_cache, v_cache, lengths, scale, softcap, config)
        return out, (q, k_cache, v_cache, lengths)

    def bwd(scale, softcap, config, res, do):
        del config
        q, k_cache, v_cache, lengths = res
        _, vjp = jax.vjp(
            lambda q, k, v: decode_attention_xla(q, k, v, lengths, scale=scale, softcap=softcap),
            q,
            k_cache,
            v_cache,
        )
        return (*vjp(do), None)

    f.defvjp(fwd, bwd)
    return f
