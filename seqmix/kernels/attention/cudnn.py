"""cuDNN flash attention through ``jax.nn.dot_product_attention(implementation="cudnn")``.

What that path serves (jax 0.11, ``jax._src.cudnn.fused_attention_stablehlo``), and so
what these wrappers accept; anything else raises ``NotImplementedError`` with the reason:

- bf16 or fp16 inputs (cuDNN's flash kernels have no fp32 path);
- head dim a multiple of 8, at most 256 on Hopper and newer (128 before);
- no mask, causal, or a left window ``(left, 0)`` (cuDNN's sliding window is causal-only);
  masks other than full attention need ``T == S`` (cuDNN's causal diagonal alignment for
  ``T != S`` is not the one of seqmix's oracle, which aligns positions at 0);
- no ``segment_ids`` (jax exposes cuDNN's packed layout only as a dense ``[B, T, S]`` mask),
  no ``softcap``, no ``return_lse`` (jax returns cuDNN's statistics cast to the input dtype
  and without a derivative).

GQA/MQA is native. Gradients are cuDNN's own backward.

Masking is exact around cuDNN (whose masked probabilities of 0 times a NaN value would be
NaN): the NaN and Inf entries of k and v (and of the cache slots past ``lengths``) are
zeroed before the call, and the rows that attend a bad key are set to NaN after it
(``_bad_keys``, ``_reached``). Elementwise, so XLA fuses the zeroing into what produces k
and v; what it costs is in BENCHMARKS.md.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

DTYPES = (jnp.bfloat16, jnp.float16)


def _gpus() -> list:
    try:
        return jax.devices("gpu")
    except RuntimeError:
        return []


def _max_head_dim() -> int:
    gpus = _gpus()
    if not gpus:
        return 256  # checked again by jax on the device itself
    major = int(str(getattr(gpus[0], "compute_capability", "9.0")).split(".")[0])
    return 256 if major >= 9 else 128


def _require_gpu(op: str) -> None:
    if not _gpus():
        # e.g. lowering for a GPU on a CPU (seqmix.testing.lower_for): cuDNN is not linked
        raise NotImplementedError(f"cudnn {op} needs a GPU in this process")


def _check_common(op: str, dtype, head_dim: int, softcap) -> None:
    if not any(dtype == jnp.dtype(d) for d in DTYPES):
        raise NotImplementedError(f"cudnn {op} takes bfloat16 or float16 inputs, got {dtype}")
    limit = _max_head_dim()
    if head_dim % 8 or head_dim > limit:
        raise NotImplementedError(
            f"cudnn {op} needs a head dim that is a multiple of 8 and <= {limit}, got {head_dim}"
        )
    if softcap is not None:
        raise NotImplementedError(f"cudnn {op} has no softcap (got softcap={softcap})")


def _bad_keys(k, v, valid=None):
    """``(k, v, bad)``: k and v ``[B, S, Hkv, D]`` with their NaN and Inf entries zeroed (and
    every entry of a slot where ``valid [B, S]`` is false), and ``bad [B, S, Hkv]``: a valid
    key whose key or value held one."""
    fin_k, fin_v = jnp.isfinite(k), jnp.isfinite(v)
    bad = jnp.logical_not(jnp.all(fin_k, axis=-1) & jnp.all(fin_v, axis=-1))
    if valid is not None:
        fin_k = fin_k & valid[:, :, None, None]
        fin_v = fin_v & valid[:, :, None, None]
        bad = bad & valid[:, :, None]
    zero = jnp.zeros((), k.dtype)
    return jnp.where(fin_k, k, zero), jnp.where(fin_v, v, zero), bad


def _reached(o, hit):
    """``o [B, T, Hq, D]`` NaN where ``hit [B, T, Hkv]`` (a query head reads kv head
    ``h // (Hq // Hkv)``)."""
    B, T, Hq, D = o.shape
    Hkv = hit.shape[2]
    o = o.reshape(B, T, Hkv, Hq // Hkv, D)
    o = jnp.where(hit[..., None, None], jnp.asarray(jnp.nan, o.dtype), o)
    return o.reshape(B, T, Hq, D)


def _rows_reached(bad, T, is_causal, left):
    """``[B, T, Hkv]``: the query rows that see a bad key (``bad [B, S, Hkv]``): any key for
    full attention, keys ``t - left .. t`` for a causal (window) mask (``T == S``)."""
    if not is_causal:
        return jnp.broadcast_to(
            jnp.any(bad, axis=1, keepdims=True), (bad.shape[0], T, bad.shape[2])
        )
    count = jnp.cumsum(bad.astype(jnp.int32), axis=1)  # bad keys at or before t
    if left is None or left + 1 >= T:
        return count > 0
    before = jnp.pad(count, ((0, 0), (left + 1, 0), (0, 0)))[:, :T]  # ... before t - left
    return count - before > 0


def attention(
    q, k, v, *, causal, window, segment_ids, softcap, scale, return_lse, kv_segment_ids=None
):
    """The ``cudnn`` implementation of ``seqmix.kernels.attention`` (normalised arguments,
    see ``api.py``): returns ``(o, None)``."""
    del kv_segment_ids  # given only with segment_ids, which this implementation refuses
    _check_common("attention", q.dtype, q.shape[-1], softcap)
    if return_lse:
        raise NotImplementedError(
            "cudnn attention cannot return the log-sum-exp (jax.nn.dot_product_attention "
            "returns cuDNN's statistics in the input dtype and without a gradient)"
        )
    if segment_ids is not None:
        raise NotImplementedError(
            "cudnn attention through jax.nn.dot_product_attention takes no segment_ids "
            "(only a dense [B, T, S] mask)"
        )
    left, right = window
    T, S = q.shape[1], k.shape[1]
    if right is None and left is not None:
        raise NotImplementedError(
            f"cudnn attention supports only causal windows (left, 0), got window={window}"
        )
    if right is not None and right != 0:
        raise NotImplementedError(
            f"cudnn attention supports only causal windows (left, 0), got window={window}"
        )
    is_causal = right == 0
    if is_causal and T != S:
        raise NotImplementedError(
            f"cudnn causal/windowed attention needs T == S here, got T={T}, S={S}"
        )
    _require_gpu("attention")
    k, v, bad = _bad_keys(k, v)
    o = jax.nn.dot_product_attention(
        q,
        k,
        v,
        scale=scale,
        is_causal=is_causal,
        local_window_size=None if left is None else (left, 0),
        implementation="cudnn",
    )
    return _reached(o, _rows_reached(bad, T, is_causal, left)), None


def decode_attention(q, k_cache, v_cache, lengths, *, scale, softcap):
    """The ``cudnn`` implementation of ``seqmix.kernels.decode_attention``: one query per row
    over the first ``lengths[b]`` cache entries (``key_value_seq_lengths``). A row of
    length 0 gets output 0."""
    _check_common("decode_attention", q.dtype, q.shape[-1], softcap)
    B, S = k_cache.shape[:2]
    lengths = lengths.astype(jnp.int32)
    _require_gpu("decode_attention")
    valid = jnp.arange(S)[None, :] < lengths[:, None]
    k_cache, v_cache, bad = _bad_keys(k_cache, v_cache, valid)
    o = jax.nn.dot_product_attention(
        q[:, None],
        k_cache,
        v_cache,
        scale=scale,
        query_seq_lengths=jnp.ones((B,), jnp.int32),
        key_value_seq_lengths=lengths,
        implementation="cudnn",
    )
    o = _reached(o, jnp.any(bad, axis=1, keepdims=True))[:, 0]
    return jnp.where((lengths > 0)[:, None, None], o, jnp.zeros_like(o))
