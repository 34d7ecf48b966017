"""Public softmax-attention ops: argument checks, normalisation and dispatch."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from seqmix.kernels import checks
from seqmix.kernels.attention import reference
from seqmix.kernels.dispatch import Op

Array = jax.Array


# Every attention implementation is called as impl(q, k, v, *, causal, window, segment_ids,
# softcap, scale, return_lse) with normalised arguments and returns (o, lse); lse may be None
# when return_lse is False. It raises NotImplementedError for arguments it cannot serve.


def _naive(q, k, v, *, return_lse, **kw):
    return reference.attention_naive(q, k, v, **kw)


def _xla(q, k, v, *, return_lse, **kw):
    return reference.attention_xla(q, k, v, **kw)


ATTENTION = Op(
    "attention",
    impls={
        "naive": _naive,
        "xla": _xla,
        "pallas_triton": "seqmix.kernels.attention.triton:attention",
        "pallas_tpu": "seqmix.kernels.attention.tpu:attention",
        "cudnn": "seqmix.kernels.attention.cudnn:attention",
    },
    # GPU: cuDNN where it serves the arguments (bf16/fp16, no softcap, segments, lse or
    # two-sided windows), then seqmix's Triton kernel: the order measured in BENCHMARKS.md.
    # TPU: xla until the Pallas TPU kernels have been compiled and timed on a TPU.
    auto={"cpu": ("xla",), "gpu": ("cudnn", "pallas_triton", "xla"), "tpu": ("xla",)},
)

DECODE_ATTENTION = Op(
    "decode_attention",
    impls={
        "naive": reference.decode_attention_naive,
        "xla": reference.decode_attention_xla,
        "pallas_triton": "seqmix.kernels.attention.decode:decode_attention_triton",
        "pallas_tpu": "seqmix.kernels.attention.decode:decode_attention_tpu",
        "cudnn": "seqmix.kernels.attention.cudnn:decode_attention",
    },
    auto={"cpu": ("xla",), "gpu": ("cudnn", "pallas_triton", "xla"), "tpu": ("xla",)},
)


def normalize_window(
    local_window_size: int | tuple[int, int] | None, causal: bool
) -> tuple[int | None, int | None]:
    """``local_window_size`` as ``(left, right)``; ``None`` marks an unbounded side."""
    if local_window_size is None:
        left, right = None, None
    else:
        if isinstance(local_window_size, int):
            left = right = local_window_size
        else:
            try:
                left, right = local_window_size
            except (TypeError, ValueError):
                raise ValueError(
                    "local_window_size must be None, an int w or a pair (left, right), got "
                    f"{local_window_size!r}"
                ) from None
        for side in (left, right):
            if not isinstance(side, int) or side < 0:
                raise ValueError(
                    f"local_window_size must hold ints >= 0, got {local_window_size!r}"
                )
    if causal:
        right = 0
    return left, right


def attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    causal: bool = False,
    local_window_size: int | tuple[int, int] | None = None,
    segment_ids: Array | None = None,
    softcap: float | None = None,
    scale: float | None = None,
    return_lse: bool = False,
    implementation: str | None = None,
) -> Array | tuple[Array, Array]:
    """Softmax attention ``softmax(scale * q k^T + mask) v`` with grouped heads.

    Args:
      q: ``[B, T, H, D]``.
      k, v: ``[B, S, Hkv, D]`` with ``H % Hkv == 0``; query head ``h`` reads KV head
        ``h // (H // Hkv)`` (GQA; MQA when ``Hkv == 1``).
      causal: query ``t`` sees keys ``s <= t`` (positions aligned at 0).
      local_window_size: ``w`` or ``(left, right)``: query ``t`` sees keys in
        ``[t - left, t + right]`` (``right = 0`` when causal), as ``jax.nn.dot_product_attention``.
      segment_ids: ``[B, T]`` ints (self-attention, ``S == T``): a query sees only keys with
        the same id.
      softcap: ``c``: logits become ``c * tanh(s / c)``.
      scale: logit scale, default ``D ** -0.5``.
      return_lse: also return the natural log-sum-exp of the visible logits, ``[B, T, H]``
        float32 (``-inf`` for a query that sees no key; its output is 0).
      implementation: see ``seqmix.kernels.dispatch``.

    Returns:
      ``o [B, T, H, D]`` in q's dtype, or ``(o, lse)``.
    """
    checks.check_array("q", q, 4, "[batch, time, heads, head_dim]")
    B, T, H, D = q.shape
    checks.check_array("k", k, 4, "[batch, kv_time, kv_heads, head_dim]", shape=(B, None, None, D))
    S, Hkv = k.shape[1], k.shape[2]
    checks.check_array("v", v, 4, "[batch, kv_time, kv_heads, head_dim]", shape=(B, S, Hkv, D))
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    checks.check_heads("q", H, "k/v", Hkv)
    window = normalize_window(local_window_size, causal)
    if segment_ids is not None:
        if S != T:
            raise ValueError(
                f"segment_ids needs self-attention (kv_time == time), got T={T} and S={S}"
            )
        checks.check_int_array("segment_ids", segment_ids, 2, "[batch, time]", shape=(B, T))
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be > 0 or None, got {softcap!r}")
    o, lse = ATTENTION(
        implementation,
        q,
        k,
        v,
        causal=bool(causal),
        window=window,
        segment_ids=segment_ids,
        softcap=None if softcap is None else float(softcap),
        scale=checks.default_scale(scale, D),
        return_lse=bool(return_lse),
    )
    return (o, lse) if return_lse else o


def decode_attention(
    q: Array,
    k_cache: Array,
    v_cache: Array,
    lengths: Array,
    *,
    scale: float | None = None,
    softcap: float | None = None,
    implementation: str | None = None,
) -> Array:
    """Attention of one new query per row over a KV cache.

    Args:
      q: ``[B, H, D]``.
      k_cache, v_cache: ``[B, S, Hkv, D]``, ``H % Hkv == 0``.
      lengths: ``[B]`` ints: row ``b`` attends to cache entries ``[0, lengths[b])``
        (a row of length 0 gets output 0).

    Returns:
      ``o [B, H, D]`` in q's dtype.
    """
    checks.check_array("q", q, 3, "[batch, heads, head_dim]")
    B, H, D = q.shape
    checks.check_array(
        "k_cache", k_cache, 4, "[batch, cache_len, kv_heads, head_dim]", shape=(B, None, None, D)
    )
    S, Hkv = k_cache.shape[1], k_cache.shape[2]
    checks.check_array(
        "v_cache", v_cache, 4, "[batch, cache_len, kv_heads, head_dim]", shape=(B, S, Hkv, D)
    )
    checks.check_heads("q", H, "k_cache", Hkv)
    lengths = jnp.asarray(lengths)
    checks.check_int_array("lengths", lengths, 1, "[batch]", shape=(B,))
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be > 0 or None, got {softcap!r}")
    return DECODE_ATTENTION(
        implementation,
        q,
        k_cache,
        v_cache,
        lengths,
        scale=checks.default_scale(scale, D),
        softcap=None if softcap is None else float(softcap),
    )
