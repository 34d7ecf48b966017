"""Public gated linear-attention ops (linear attention, RetNet, GLA, Mamba-2 SSD)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from seqmix.kernels import checks
from seqmix.kernels.dispatch import Op
from seqmix.kernels.linear_attention import reference, tuning

Array = jax.Array

# The normaliser of ``normalize=True`` is added to the denominator with this epsilon.
NORMALIZE_EPS = 1e-6


def _naive(q, k, v, g, *, scale, initial_state, runs, chunk_size):
    del chunk_size
    return reference.linear_attention_naive(
        q, k, v, g, scale=scale, initial_state=initial_state, runs=runs
    )


# Every implementation is called as impl(q, k, v, g, *, scale, initial_state, runs,
# chunk_size[, config]) with normalised arguments (reference.py's docstring) and returns
# (o, final_state); it raises NotImplementedError for arguments it cannot serve. The Pallas
# backends take config= (their Config in tuning.py, or None).
LINEAR_ATTENTION = Op(
    "linear_attention",
    impls={
        "naive": _naive,
        "xla": reference.linear_attention_xla,
        "pallas_triton": "seqmix.kernels.linear_attention.triton:linear_attention",
        "pallas_mosaic_gpu": "seqmix.kernels.linear_attention.mosaic_gpu:linear_attention",
        "pallas_tpu": "seqmix.kernels.linear_attention.tpu:linear_attention",
    },
    # pallas_mosaic_gpu (Hopper) comes first where the benchmark measured it faster than
    # pallas_triton (tuning.MOSAIC_GPU_AUTO), and is passed over elsewhere.
    auto={"cpu": ("xla",), "gpu": ("pallas_mosaic_gpu", "pallas_triton", "xla"), "tpu": ("xla",)},
    configs={
        "pallas_triton": tuning.TritonConfig,
        "pallas_mosaic_gpu": tuning.MosaicGpuConfig,
        "pallas_tpu": tuning.TpuConfig,
    },
    auto_skip={"pallas_mosaic_gpu": tuning.mosaic_gpu_auto_skip},
)

LINEAR_ATTENTION_STEP = Op(
    "linear_attention_step",
    impls={
        "naive": reference.linear_attention_step_reference,
        "xla": reference.linear_attention_step_reference,
        "pallas_triton": "seqmix.kernels.linear_attention.triton:linear_attention_step",
        "pallas_tpu": "seqmix.kernels.linear_attention.tpu:linear_attention_step",
    },
    # XLA on GPU: as fast as the kernel at B = 1 and faster from B = 16 (BENCHMARKS.md,
    # linear_attention_step)
    auto={"cpu": ("xla",), "gpu": ("xla",), "tpu": ("xla",)},
    configs={"pallas_triton": tuning.TritonStepConfig, "pallas_tpu": tuning.TpuStepConfig},
)


def segment_runs(segment_ids: Array) -> Array:
    """``[B, T]`` segment ids -> non-decreasing run indices (a new run wherever the id
    changes), so that packed rows reset their state at every segment start."""
    change = (segment_ids[:, 1:] != segment_ids[:, :-1]).astype(jnp.int32)
    return jnp.concatenate(
        [jnp.zeros_like(segment_ids[:, :1], jnp.int32), jnp.cumsum(change, axis=1)], axis=1
    )


def _check_decay(log_decay, B, T, Hv, K, layout_prefix):
    if log_decay is None:
        return None
    if not hasattr(log_decay, "ndim") or log_decay.ndim not in (
        len(layout_prefix) + 1,
        len(layout_prefix) + 2,
    ):
        raise ValueError(
            f"log_decay must have shape [{', '.join(layout_prefix)}, heads] (a scalar per "
            f"head) or [{', '.join(layout_prefix)}, heads, key_dim] (per channel), got "
            f"{getattr(log_decay, 'shape', log_decay)}"
        )
    want = (B, T, Hv, K)[: log_decay.ndim] if T is not None else (B, Hv, K)[: log_decay.ndim]
    checks.check_array(
        "log_decay",
        log_decay,
        log_decay.ndim,
        "[" + ", ".join(layout_prefix) + ", heads(, key_dim)]",
        shape=want,
    )
    checks.check_nonpositive("log_decay", log_decay)
    return checks.floor_log_decay(log_decay.astype(jnp.promote_types(log_decay.dtype, jnp.float32)))


def _empty_final(initial_state, shape, dtype):
    """The state after no token: the initial state, or zeros (float32, float64 for float64
    inputs)."""
    if initial_state is not None:
        return initial_state
    return jnp.zeros(shape, checks.accum_dtype(dtype))


def _normalized_v(v):
    """v with a column of ones appended: its output column is the normaliser q^T z."""
    return jnp.concatenate([v, jnp.ones(v.shape[:-1] + (1,), v.dtype)], axis=-1)


def _divide(o_aug, dtype):
    num = o_aug[..., :-1].astype(jnp.float32)
    den = o_aug[..., -1:].astype(jnp.float32)
    return (num / (den + NORMALIZE_EPS)).astype(dtype)


def linear_attention(
    q: Array,
    k: Array,
    v: Array,
    log_decay: Array | None = None,
    *,
    scale: float | None = None,
    initial_state: Array | None = None,
    return_final_state: bool = False,
    segment_ids: Array | None = None,
    normalize: bool = False,
    chunk_size: int = 64,
    implementation: str | None = None,
    config: tuning.TritonConfig | tuning.MosaicGpuConfig | tuning.TpuConfig | None = None,
) -> Array | tuple[Array, Array]:
    """Causal gated linear attention, chunked.

    ``S_t = exp(g_t) * S_{t-1} + k_t v_t^T`` and ``o_t = scale * q_t^T S_t`` with
    ``S_{-1} = initial_state`` (or 0), ``g = log_decay``.

    Args:
      q, k: ``[B, T, Hqk, K]``.
      v: ``[B, T, Hv, V]`` with ``Hv % Hqk == 0``; v head ``h`` reads q/k head
        ``h // (Hv // Hqk)`` (Mamba-2 groups).
      log_decay: None (no decay), ``[B, T, Hv]`` (a scalar per head: RetNet, Mamba-2 SSD,
        simple GLA) or ``[B, T, Hv, K]`` (per key channel: GLA); <= 0, float32 inside.
        ``-inf`` is a hard reset of that head (or channel): the state before it is dropped
        exactly; decays below ``checks.LOG_DECAY_FLOOR`` (-110) act as -110, whose
        exponential is 0 in float32.
      scale: default ``K ** -0.5``.
      initial_state: float32 ``[B, Hv, K, V]`` (``[B, Hv, K, V + 1]`` when ``normalize``).
      return_final_state: also return the state after the last token (same shape).
      segment_ids: ``[B, T]`` ints; the state resets to zero wherever the id changes.
      normalize: divide by ``scale * q_t^T z_t + 1e-6`` where ``z_t`` is the same recurrence
        over ``k_t``. The state then carries ``z`` as an extra last column. The output does
        not change when q is scaled, so dq is a difference of nearly equal terms: with bf16
        inputs the Pallas kernels' dq (and d initial_state) lands 0.5-1.5e-2 from the float32
        answer, where every other gradient stays under 5e-3 (measured in the tests); pass
        float32 inputs where that matters.
      chunk_size: tokens per chunk of the chunked implementations.
      implementation: see ``seqmix.kernels.dispatch``. ``"pallas_mosaic_gpu"`` (Hopper) serves
        bf16/fp16 inputs with ``chunk_size=64`` and key dims up to 128.
      config: the tuning of a Pallas backend, ``tuning.TritonConfig`` (pallas_triton),
        ``tuning.MosaicGpuConfig`` (pallas_mosaic_gpu) or ``tuning.TpuConfig`` (pallas_tpu);
        None: the table's for this GPU generation. With ``implementation=None`` a config
        selects its backend.

    Empty inputs: ``B`` or ``T`` may be 0: an empty ``o`` and the final state equals the
    initial state (zeros when None), computed without an implementation (the same for every
    one). Heads and ``K``, ``V`` must be >= 1; ``scale`` finite; ``chunk_size`` a whole
    number >= 1.

    Returns:
      ``o [B, T, Hv, V]`` in q's dtype, or ``(o, final_state)``.
    """
    checks.check_array("q", q, 4, "[batch, time, qk_heads, key_dim]")
    checks.check_sizes("q", q, "[batch, time, qk_heads, key_dim]", (2, 3))
    B, T, Hqk, K = q.shape
    checks.check_array("k", k, 4, "[batch, time, qk_heads, key_dim]", shape=(B, T, Hqk, K))
    checks.check_array("v", v, 4, "[batch, time, v_heads, value_dim]", shape=(B, T, None, None))
    checks.check_sizes("v", v, "[batch, time, v_heads, value_dim]", (2, 3))
    Hv, V = v.shape[2], v.shape[3]
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    checks.check_heads("v", Hv, "q/k", Hqk)
    g = _check_decay(log_decay, B, T, Hv, K, ("batch", "time"))
    chunk_size = checks.as_int(chunk_size, "chunk_size", minimum=1)
    scale = checks.default_scale(scale, K)
    Vs = V + 1 if normalize else V
    if initial_state is not None:
        checks.check_array(
            "initial_state",
            initial_state,
            4,
            "[batch, v_heads, key_dim, value_dim" + (" + 1]" if normalize else "]"),
            shape=(B, Hv, K, Vs),
        )
        initial_state = initial_state.astype(jnp.promote_types(initial_state.dtype, jnp.float32))
    runs = None
    if segment_ids is not None:
        checks.check_int_array("segment_ids", segment_ids, 2, "[batch, time]", shape=(B, T))
    if checks.empty(B, T):
        LINEAR_ATTENTION.validate(implementation, config)
        o = jnp.zeros((B, T, Hv, V), q.dtype)
        final = _empty_final(initial_state, (B, Hv, K, Vs), q.dtype)
        return (o, final) if return_final_state else o
    if segment_ids is not None:
        runs = segment_runs(segment_ids)
    o, final = LINEAR_ATTENTION(
        implementation,
        q,
        k,
        _normalized_v(v) if normalize else v,
        g,
        scale=scale,
        initial_state=initial_state,
        runs=runs,
        chunk_size=chunk_size,
        config=config,
    )
    if normalize:
        o = _divide(o, q.dtype)
    return (o, final) if return_final_state else o


def linear_attention_step(
    q: Array,
    k: Array,
    v: Array,
    state: Array,
    log_decay: Array | None = None,
    *,
    scale: float | None = None,
    normalize: bool = False,
    implementation: str | None = None,
    config: tuning.TritonStepConfig | tuning.TpuStepConfig | None = None,
) -> tuple[Array, Array]:
    """One token of ``linear_attention`` for a batch of rows (decoding).

    Args:
      q, k: ``[B, Hqk, K]``; v: ``[B, Hv, V]``; state: float32 ``[B, Hv, K, V]``
        (``V + 1`` columns when ``normalize``); log_decay: None, ``[B, Hv]`` or
        ``[B, Hv, K]``; config: ``tuning.TritonStepConfig`` or ``tuning.TpuStepConfig``
        (None: the table's).

    ``B == 0`` gives empty results, computed without an implementation.

    Returns:
      ``(o [B, Hv, V], new_state)``.
    """
    checks.check_array("q", q, 3, "[batch, qk_heads, key_dim]")
    checks.check_sizes("q", q, "[batch, qk_heads, key_dim]", (1, 2))
    B, Hqk, K = q.shape
    checks.check_array("k", k, 3, "[batch, qk_heads, key_dim]", shape=(B, Hqk, K))
    checks.check_array("v", v, 3, "[batch, v_heads, value_dim]", shape=(B, None, None))
    checks.check_sizes("v", v, "[batch, v_heads, value_dim]", (1, 2))
    Hv, V = v.shape[1], v.shape[2]
    checks.check_heads("v", Hv, "q/k", Hqk)
    Vs = V + 1 if normalize else V
    checks.check_array(
        "state",
        state,
        4,
        "[batch, v_heads, key_dim, value_dim" + (" + 1]" if normalize else "]"),
        shape=(B, Hv, K, Vs),
    )
    g = _check_decay(log_decay, B, None, Hv, K, ("batch",))
    scale = checks.default_scale(scale, K)
    state = state.astype(jnp.promote_types(state.dtype, jnp.float32))
    if checks.empty(B):
        LINEAR_ATTENTION_STEP.validate(implementation, config)
        return jnp.zeros((B, Hv, V), q.dtype), state
    o, new_state = LINEAR_ATTENTION_STEP(
        implementation,
        q,
        k,
        _normalized_v(v) if normalize else v,
        state,
        g,
        scale=scale,
        config=config,
    )
    if normalize:
        o = _divide(o, q.dtype)
    return o, new_state
