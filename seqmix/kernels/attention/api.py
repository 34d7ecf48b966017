"""Public softmax-attention ops: argument checks, normalisation and dispatch."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from seqmix.kernels import checks
from seqmix.kernels.attention import reference, tuning
from seqmix.kernels.dispatch import Op

Array = jax.Array


# Every attention implementation is called as impl(q, k, v, *, causal, window, segment_ids,
# kv_segment_ids, softcap, scale, return_lse[, config]) with normalised arguments
# (kv_segment_ids None with segment_ids given: self-attention, the keys' ids are the
# queries') and returns (o, lse); lse
# may be None when return_lse is False. It raises NotImplementedError for arguments it cannot
# serve. The Pallas backends take config= (their Config in tuning.py, or None).


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
    configs={"pallas_triton": tuning.TritonConfig, "pallas_tpu": tuning.TpuConfig},
)

DECODE_ATTENTION = Op(
    "decode_attention",
    impls={
        "naive": reference.decode_attention_naive,
        "xla": reference.decode_attention_xla,
        "pallas_triton": "seqmix.kernels.attention.triton:decode_attention",
        "pallas_tpu": "seqmix.kernels.attention.tpu:decode_attention",
        "cudnn": "seqmix.kernels.attention.cudnn:decode_attention",
    },
    # GPU: the Triton decoder first; cuDNN, which needs the cache's non-finite entries and
    # the slots past the lengths zeroed before it (an extra pass over the cache), took 3x its
    # time (BENCHMARKS.md, decode_attention)
    auto={"cpu": ("xla",), "gpu": ("pallas_triton", "cudnn", "xla"), "tpu": ("xla",)},
    configs={"pallas_triton": tuning.TritonDecodeConfig, "pallas_tpu": tuning.TpuDecodeConfig},
)


def normalize_window(
    local_window_size: int | tuple[int, int] | None, causal: bool
) -> tuple[int | None, int | None]:
    """``local_window_size`` as ``(left, right)``; ``None`` marks an unbounded side.

    ``w`` or each side is a whole number >= 0 (Python, NumPy or JAX integer scalars;
    booleans refused), or None for an unbounded side."""
    if local_window_size is None:
        left, right = None, None
    elif isinstance(local_window_size, (tuple, list)):
        if len(local_window_size) != 2:
            raise ValueError(
                "local_window_size must be None, an int w or a pair (left, right), got "
                f"{local_window_size!r}"
            )
        left, right = (
            None if side is None else checks.as_int(side, f"local_window_size[{i}]", minimum=0)
            for i, side in enumerate(local_window_size)
        )
    else:
        left = right = checks.as_int(local_window_size, "local_window_size", minimum=0)
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
    kv_segment_ids: Array | None = None,
    softcap: float | None = None,
    scale: float | None = None,
    return_lse: bool = False,
    implementation: str | None = None,
    config: tuning.TritonConfig | tuning.TpuConfig | None = None,
) -> Array | tuple[Array, Array]:
    """Softmax attention ``softmax(scale * q k^T + mask) v`` with grouped heads.

    Args:
      q: ``[B, T, H, D]``.
      k, v: ``[B, S, Hkv, D]`` with ``H % Hkv == 0``; query head ``h`` reads KV head
        ``h // (H // Hkv)`` (GQA; MQA when ``Hkv == 1``).
      causal: query ``t`` sees keys ``s <= t`` (positions aligned at 0).
      local_window_size: ``w`` or ``(left, right)``: query ``t`` sees keys in
        ``[t - left, t + right]`` (``right = 0`` when causal), as ``jax.nn.dot_product_attention``.
      segment_ids: ``[B, T]`` ints: a query sees only keys with the same id. Without
        ``kv_segment_ids`` they are the keys' ids too (self-attention, ``S == T``).
      kv_segment_ids: ``[B, S]`` ints, the keys' ids where they are not the queries' (a
        block of a packed sequence against another block of it); needs ``segment_ids``.
        Query ``t`` sees key ``s`` only if ``segment_ids[b, t] == kv_segment_ids[b, s]``.
      softcap: ``c``: logits become ``c * tanh(s / c)``.
      scale: logit scale, default ``D ** -0.5``.
      return_lse: also return the natural log-sum-exp of the visible logits, ``[B, T, H]``
        float32 (``-inf`` for a query that sees no key; its output is 0).

    Empty inputs: ``B``, ``T`` or ``S`` may be 0; the result is then computed without an
    implementation (the same for every one): an empty ``o``, or zeros with ``lse = -inf``
    when ``S == 0`` (no query sees a key). Heads and ``D`` must be >= 1; ``scale`` and
    ``softcap`` finite (``softcap > 0``); window sizes whole numbers >= 0.
      implementation: see ``seqmix.kernels.dispatch``.
      config: the tiles of a Pallas backend, ``tuning.TritonConfig`` (pallas_triton) or
        ``tuning.TpuConfig`` (pallas_tpu); None: the table's for this GPU generation. With
        ``implementation=None`` a config selects its backend.

    Returns:
      ``o [B, T, H, D]`` in q's dtype, or ``(o, lse)``.
    """
    checks.check_array("q", q, 4, "[batch, time, heads, head_dim]")
    checks.check_sizes("q", q, "[batch, time, heads, head_dim]", (2, 3))
    B, T, H, D = q.shape
    checks.check_array("k", k, 4, "[batch, kv_time, kv_heads, head_dim]", shape=(B, None, None, D))
    checks.check_sizes("k", k, "[batch, kv_time, kv_heads, head_dim]", (2,))
    S, Hkv = k.shape[1], k.shape[2]
    checks.check_array("v", v, 4, "[batch, kv_time, kv_heads, head_dim]", shape=(B, S, Hkv, D))
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    checks.check_heads("q", H, "k/v", Hkv)
    window = normalize_window(local_window_size, causal)
    if kv_segment_ids is not None:
        if segment_ids is None:
            raise ValueError("kv_segment_ids needs segment_ids (the queries' ids)")
        checks.check_int_array(
            "kv_segment_ids", kv_segment_ids, 2, "[batch, kv_time]", shape=(B, S)
        )
    if segment_ids is not None:
        if S != T and kv_segment_ids is None:
            raise ValueError(
                f"segment_ids without kv_segment_ids needs self-attention (kv_time == time), "
                f"got T={T} and S={S}"
            )
        checks.check_int_array("segment_ids", segment_ids, 2, "[batch, time]", shape=(B, T))
    softcap = checks.check_softcap(softcap)
    scale = checks.default_scale(scale, D)
    if checks.empty(B, T, S):
        ATTENTION.validate(implementation, config)
        o = jnp.zeros(q.shape, q.dtype)
        lse = jnp.full((B, T, H), -jnp.inf, jnp.float32)
    else:
        o, lse = ATTENTION(
            implementation,
            q,
            k,
            v,
            causal=bool(causal),
            window=window,
            segment_ids=segment_ids,
            kv_segment_ids=kv_segment_ids,
            softcap=softcap,
            scale=scale,
            return_lse=bool(return_lse),
            config=config,
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
    config: tuning.TritonDecodeConfig | tuning.TpuDecodeConfig | None = None,
) -> Array:
    """Attention of one new query per row over a KV cache.

    Args:
      q: ``[B, H, D]``.
      k_cache, v_cache: ``[B, S, Hkv, D]``, ``H % Hkv == 0``.
      lengths: ``[B]`` ints in ``[0, S]``: row ``b`` attends to cache entries
        ``[0, lengths[b])`` (a row of length 0 gets output 0); checked when concrete (not
        under ``jit``, where the values are traced).
      scale, softcap: as for ``attention`` (finite; ``softcap > 0``).
      config: ``tuning.TritonDecodeConfig`` or ``tuning.TpuDecodeConfig`` (None: the
        table's); see ``attention``.

    Empty inputs: ``B == 0`` gives an empty output and ``S == 0`` (every length 0) zeros,
    computed without an implementation (the same for every one).

    Returns:
      ``o [B, H, D]`` in q's dtype.
    """
    checks.check_array("q", q, 3, "[batch, heads, head_dim]")
    checks.check_sizes("q", q, "[batch, heads, head_dim]", (1, 2))
    B, H, D = q.shape
    checks.check_array(
        "k_cache", k_cache, 4, "[batch, cache_len, kv_heads, head_dim]", shape=(B, None, None, D)
    )
    checks.check_sizes("k_cache", k_cache, "[batch, cache_len, kv_heads, head_dim]", (2,))
    S, Hkv = k_cache.shape[1], k_cache.shape[2]
    checks.check_array(
        "v_cache", v_cache, 4, "[batch, cache_len, kv_heads, head_dim]", shape=(B, S, Hkv, D)
    )
    checks.check_heads("q", H, "k_cache", Hkv)
    lengths = jnp.asarray(lengths)
    checks.check_int_array("lengths", lengths, 1, "[batch]", shape=(B,))
    checks.check_lengths("lengths", lengths, S)
    softcap = checks.check_softcap(softcap)
    scale = checks.default_scale(scale, D)
    if checks.empty(B, S):
        DECODE_ATTENTION.validate(implementation, config)
        return jnp.zeros(q.shape, q.dtype)
    return DECODE_ATTENTION(
        implementation,
        q,
        k_cache,
        v_cache,
        lengths,
        scale=scale,
        softcap=softcap,
        config=config,
    )
