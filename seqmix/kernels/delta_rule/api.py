"""Public gated delta rule ops (Gated DeltaNet; DeltaNet with no decay)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from seqmix.kernels import checks
from seqmix.kernels.delta_rule import reference, tuning
from seqmix.kernels.dispatch import IMPLEMENTATIONS, Op
from seqmix.kernels.linear_attention.api import segment_runs

Array = jax.Array


def _naive(q, k, v, beta, g, *, scale, initial_state, runs, chunk_size, config=None):
    del chunk_size, config  # the oracle has no tiling
    return reference.gated_delta_rule_naive(
        q, k, v, beta, g, scale=scale, initial_state=initial_state, runs=runs
    )


def _xla(q, k, v, beta, g, *, scale, initial_state, runs, chunk_size, config=None):
    del config  # plain XLA: nothing to tune beyond the chunk size
    return reference.gated_delta_rule_xla(
        q, k, v, beta, g, scale=scale, initial_state=initial_state, runs=runs, chunk_size=chunk_size
    )


def _step(q, k, v, beta, state, g, *, scale, config=None):
    del config
    return reference.gated_delta_rule_step_reference(q, k, v, beta, state, g, scale=scale)


# Every implementation is called as impl(q, k, v, beta, g, *, scale, initial_state, runs,
# chunk_size, config) with normalised arguments (reference.py's docstring) and returns
# (o, final_state); it raises NotImplementedError for arguments it cannot serve. Kernel
# backends are added here as "module:function" entries (imported on first use) and in
# ``auto`` ahead of "xla" on their platform.
GATED_DELTA_RULE = Op(
    "gated_delta_rule",
    impls={
        "naive": _naive,
        "xla": _xla,
        "pallas_triton": "seqmix.kernels.delta_rule.triton:gated_delta_rule",
        "pallas_tpu": "seqmix.kernels.delta_rule.tpu:gated_delta_rule",
    },
    # GPU: the Triton kernels ahead of XLA (as the linear-attention engine they build on; not
    # yet measured for the delta rule). TPU: XLA until the TPU kernels (the WY transform in
    # Pallas, the passes in XLA) are measured on a TPU.
    auto={"cpu": ("xla",), "gpu": ("pallas_triton", "xla"), "tpu": ("xla",)},
    configs={"pallas_triton": tuning.TritonConfig, "pallas_tpu": tuning.TpuConfig},
)

# Called as impl(q, k, v, beta, state, g, *, scale, config); returns (o, new_state).
GATED_DELTA_RULE_STEP = Op(
    "gated_delta_rule_step",
    impls={
        "naive": _step,
        "xla": _step,
        "pallas_triton": "seqmix.kernels.delta_rule.triton:gated_delta_rule_step",
        "pallas_tpu": "seqmix.kernels.delta_rule.tpu:gated_delta_rule_step",
    },
    # XLA everywhere until the kernels are measured (the linear-attention step's XLA form is
    # as fast as its kernel on GPU).
    auto={"cpu": ("xla",), "gpu": ("xla",), "tpu": ("xla",)},
    configs={"pallas_triton": tuning.TritonStepConfig, "pallas_tpu": tuning.TpuStepConfig},
)


def _check_implementation(op: Op, implementation) -> None:
    """A ValueError naming ``op``'s implementations for a name that no op has."""
    if implementation is not None and implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"{op.name}: unknown implementation={implementation!r}; {op.name} has "
            f"{tuple(op.impls)} (or None: auto)"
        )


def _check_beta(beta, shape, layout: str):
    checks.check_array("beta", beta, len(shape), layout, shape=shape)
    if checks.is_concrete(beta):
        b = np.asarray(beta, dtype=np.float32)
        if b.size and not np.all((b >= 0) & (b <= 1)):
            raise ValueError(
                f"beta must lie in [0, 1] everywhere (a sigmoid's output), got values from "
                f"{float(np.nanmin(b))} to {float(np.nanmax(b))}"
                + (" and NaN" if np.isnan(b).any() else "")
            )
    return beta.astype(jnp.promote_types(beta.dtype, jnp.float32))


def _check_decay(log_decay, shape, layout: str):
    if log_decay is None:
        return None
    if not hasattr(log_decay, "ndim") or log_decay.ndim != len(shape):
        raise ValueError(
            f"log_decay must have shape {layout} (one scalar per v head), got "
            f"{getattr(log_decay, 'shape', log_decay)}"
        )
    checks.check_array("log_decay", log_decay, len(shape), layout, shape=shape)
    checks.check_nonpositive("log_decay", log_decay)
    return checks.floor_log_decay(log_decay.astype(jnp.promote_types(log_decay.dtype, jnp.float32)))


def _check_state(name, state, shape, layout: str):
    checks.check_array(name, state, 4, layout, shape=shape)
    return state.astype(jnp.promote_types(state.dtype, jnp.float32))


def gated_delta_rule(
    q: Array,
    k: Array,
    v: Array,
    beta: Array,
    log_decay: Array | None = None,
    *,
    scale: float | None = None,
    initial_state: Array | None = None,
    return_final_state: bool = False,
    segment_ids: Array | None = None,
    chunk_size: int = 64,
    implementation: str | None = None,
    config=None,
) -> Array | tuple[Array, Array]:
    """The gated delta rule, chunked.

    ``S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T`` and
    ``o_t = scale * S_t^T q_t`` with ``S_{-1} = initial_state`` (or 0) and ``g = log_decay``
    (0 when None: the plain delta rule, DeltaNet). Keys are expected L2-normalised (the
    layers do it); then ``I - beta_t k_t k_t^T`` is a contraction for beta in [0, 1].

    Args:
      q, k: ``[B, T, Hqk, K]``.
      v: ``[B, T, Hv, V]`` with ``Hv % Hqk == 0``; v head ``h`` reads q/k head
        ``h // (Hv // Hqk)`` (grouped value heads, as ``linear_attention``).
      beta: ``[B, T, Hv]`` writing strengths in [0, 1]; float32 inside.
      log_decay: None or ``[B, T, Hv]``, <= 0 (one scalar per v head); float32 inside.
        ``-inf`` is a hard reset of that head (decays below -110 act as -110, whose
        exponential is 0 in float32).
      scale: default ``K ** -0.5``.
      initial_state: float32 ``[B, Hv, K, V]``.
      return_final_state: also return the state after the last token.
      segment_ids: ``[B, T]`` ints; the state restarts from zero wherever the id changes.
      chunk_size: tokens per chunk of the chunked implementations.
      implementation: None (auto), ``"naive"`` (the token-by-token oracle), ``"xla"`` (the
        chunked WY form), ``"pallas_triton"`` or ``"pallas_tpu"`` (see
        ``seqmix.kernels.dispatch``).
      config: ``tuning.TritonConfig`` (pallas_triton) or ``tuning.TpuConfig`` (pallas_tpu);
        None: the table's. With ``implementation=None`` a config selects its backend.

    Empty inputs: ``B`` or ``T`` may be 0: an empty ``o`` and the final state equals the
    initial state (zeros when None), computed without an implementation (the same for every
    one). Heads and ``K``, ``V`` must be >= 1; ``scale`` finite; ``chunk_size`` a whole
    number >= 1.

    Returns:
      ``o [B, T, Hv, V]`` in q's dtype, or ``(o, final_state float32 [B, Hv, K, V])``.
    """
    _check_implementation(GATED_DELTA_RULE, implementation)
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
    beta = _check_beta(beta, (B, T, Hv), "[batch, time, v_heads]")
    g = _check_decay(log_decay, (B, T, Hv), "[batch, time, v_heads]")
    chunk_size = checks.as_int(chunk_size, "chunk_size", minimum=1)
    scale = checks.default_scale(scale, K)
    if initial_state is not None:
        initial_state = _check_state(
            "initial_state", initial_state, (B, Hv, K, V), "[batch, v_heads, key_dim, value_dim]"
        )
    runs = None
    if segment_ids is not None:
        checks.check_int_array("segment_ids", segment_ids, 2, "[batch, time]", shape=(B, T))
    if checks.empty(B, T):
        GATED_DELTA_RULE.validate(implementation, config)
        o = jnp.zeros((B, T, Hv, V), q.dtype)
        final = (
            jnp.zeros((B, Hv, K, V), checks.accum_dtype(q.dtype))
            if initial_state is None
            else initial_state
        )
        return (o, final) if return_final_state else o
    if segment_ids is not None:
        runs = segment_runs(segment_ids)
    o, final = GATED_DELTA_RULE(
        implementation,
        q,
        k,
        v,
        beta,
        g,
        scale=scale,
        initial_state=initial_state,
        runs=runs,
        chunk_size=chunk_size,
        config=config,
    )
    return (o, final) if return_final_state else o


def gated_delta_rule_step(
    q: Array,
    k: Array,
    v: Array,
    beta: Array,
    state: Array,
    log_decay: Array | None = None,
    *,
    scale: float | None = None,
    implementation: str | None = None,
    config=None,
) -> tuple[Array, Array]:
    """One token of ``gated_delta_rule`` for a batch of rows (decoding).

    Args:
      q, k: ``[B, Hqk, K]``; v: ``[B, Hv, V]``; beta: ``[B, Hv]`` in [0, 1]; state: float32
        ``[B, Hv, K, V]``; log_decay: None or ``[B, Hv]`` (<= 0); config:
        ``tuning.TritonStepConfig`` or ``tuning.TpuStepConfig`` (None: the table's).

    ``B == 0`` gives empty results, computed without an implementation.

    Returns:
      ``(o [B, Hv, V] in q's dtype, new_state float32 [B, Hv, K, V])``.
    """
    _check_implementation(GATED_DELTA_RULE_STEP, implementation)
    checks.check_array("q", q, 3, "[batch, qk_heads, key_dim]")
    checks.check_sizes("q", q, "[batch, qk_heads, key_dim]", (1, 2))
    B, Hqk, K = q.shape
    checks.check_array("k", k, 3, "[batch, qk_heads, key_dim]", shape=(B, Hqk, K))
    checks.check_array("v", v, 3, "[batch, v_heads, value_dim]", shape=(B, None, None))
    checks.check_sizes("v", v, "[batch, v_heads, value_dim]", (1, 2))
    Hv, V = v.shape[1], v.shape[2]
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    checks.check_heads("v", Hv, "q/k", Hqk)
    beta = _check_beta(beta, (B, Hv), "[batch, v_heads]")
    state = _check_state("state", state, (B, Hv, K, V), "[batch, v_heads, key_dim, value_dim]")
    g = _check_decay(log_decay, (B, Hv), "[batch, v_heads]")
    scale = checks.default_scale(scale, K)
    if checks.empty(B):
        GATED_DELTA_RULE_STEP.validate(implementation, config)
        return jnp.zeros((B, Hv, V), q.dtype), state
    return GATED_DELTA_RULE_STEP(
        implementation,
        q,
        k,
        v,
        beta,
        state,
        g,
        scale=scale,
        config=config,
    )
