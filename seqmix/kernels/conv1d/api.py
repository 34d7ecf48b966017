"""Public short causal depthwise convolution ops."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from seqmix.kernels import checks
from seqmix.kernels.conv1d import reference, tuning
from seqmix.kernels.dispatch import Op

Array = jax.Array

ACTIVATIONS = (None, "silu")

# Every implementation is called as impl(x, weight, bias, *, activation, initial_state
# [, config]) and returns (y, final_state). The Pallas backends take config= (their Config in
# tuning.py, or None); the step takes the same Config.
CAUSAL_CONV1D = Op(
    "causal_conv1d",
    impls={
        "naive": reference.causal_conv1d_naive,
        "xla": reference.causal_conv1d_xla,
        "pallas_triton": "seqmix.kernels.conv1d.triton:causal_conv1d",
        "pallas_tpu": "seqmix.kernels.conv1d.tpu:causal_conv1d",
    },
    auto={"cpu": ("xla",), "gpu": ("pallas_triton", "xla"), "tpu": ("xla",)},
    configs={"pallas_triton": tuning.TritonConfig, "pallas_tpu": tuning.TpuConfig},
)

CAUSAL_CONV1D_STEP = Op(
    "causal_conv1d_step",
    impls={
        "naive": reference.causal_conv1d_step_reference,
        "xla": reference.causal_conv1d_step_reference,
        "pallas_triton": "seqmix.kernels.conv1d.triton:causal_conv1d_step",
        "pallas_tpu": "seqmix.kernels.conv1d.tpu:causal_conv1d_step",
    },
    # XLA on GPU: within 10% of the kernel at small batch and faster at large batch
    # (BENCHMARKS.md, causal_conv1d_step)
    auto={"cpu": ("xla",), "gpu": ("xla",), "tpu": ("xla",)},
    configs={"pallas_triton": tuning.TritonConfig, "pallas_tpu": tuning.TpuConfig},
)


def _check_common(weight, bias, activation, C):
    checks.check_array("weight", weight, 2, "[width, channels]", shape=(None, C))
    if weight.shape[0] < 1:
        raise ValueError(f"weight must have width >= 1, got shape {tuple(weight.shape)}")
    if bias is not None:
        checks.check_array("bias", bias, 1, "[channels]", shape=(C,))
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def causal_conv1d(
    x: Array,
    weight: Array,
    bias: Array | None = None,
    *,
    activation: str | None = None,
    initial_state: Array | None = None,
    return_final_state: bool = False,
    implementation: str | None = None,
    config: tuning.TritonConfig | tuning.TpuConfig | None = None,
) -> Array | tuple[Array, Array]:
    """Causal depthwise convolution ``y[t] = act(bias + sum_j weight[j] * x[t - W + 1 + j])``.

    Args:
      x: ``[B, T, C]``.
      weight: ``[W, C]``; bias: ``[C]``; activation: None or ``"silu"``.
      initial_state: ``[B, W - 1, C]``, the inputs before ``t = 0`` (zeros when None).
      return_final_state: also return the last ``W - 1`` inputs, ``[B, W - 1, C]``.
      implementation: see ``seqmix.kernels.dispatch``.
      config: the tiles of a Pallas backend, ``tuning.TritonConfig`` (pallas_triton) or
        ``tuning.TpuConfig`` (pallas_tpu); None: the table's for this GPU generation. With
        ``implementation=None`` a config selects its backend.

    Empty inputs: ``B`` or ``T`` may be 0: an empty ``y`` and the final state equals the
    initial state (zeros when None), computed without an implementation (the same for every
    one). ``C`` and ``W`` must be >= 1.

    Returns:
      ``y [B, T, C]`` in x's dtype, or ``(y, final_state)``.
    """
    checks.check_array("x", x, 3, "[batch, time, channels]")
    checks.check_sizes("x", x, "[batch, time, channels]", (2,))
    B, T, C = x.shape
    _check_common(weight, bias, activation, C)
    W = weight.shape[0]
    if initial_state is not None:
        checks.check_array(
            "initial_state", initial_state, 3, "[batch, width - 1, channels]", shape=(B, W - 1, C)
        )
    if checks.empty(B, T):
        CAUSAL_CONV1D.validate(implementation, config)
        y = jnp.zeros((B, T, C), x.dtype)
        final = (
            jnp.zeros((B, W - 1, C), x.dtype)
            if initial_state is None
            else initial_state.astype(x.dtype)
        )
        return (y, final) if return_final_state else y
    y, final = CAUSAL_CONV1D(
        implementation,
        x,
        weight,
        bias,
        activation=activation,
        initial_state=initial_state,
        config=config,
    )
    return (y, final) if return_final_state else y


def causal_conv1d_step(
    x: Array,
    state: Array,
    weight: Array,
    bias: Array | None = None,
    *,
    activation: str | None = None,
    implementation: str | None = None,
    config: tuning.TritonConfig | tuning.TpuConfig | None = None,
) -> tuple[Array, Array]:
    """One token of ``causal_conv1d`` (decoding): x ``[B, C]``, state ``[B, W - 1, C]``;
    ``config`` as for ``causal_conv1d``. ``B == 0`` gives empty results, computed without
    an implementation.

    Returns:
      ``(y [B, C], new_state [B, W - 1, C])``.
    """
    checks.check_array("x", x, 2, "[batch, channels]")
    checks.check_sizes("x", x, "[batch, channels]", (1,))
    B, C = x.shape
    _check_common(weight, bias, activation, C)
    checks.check_array(
        "state", state, 3, "[batch, width - 1, channels]", shape=(B, weight.shape[0] - 1, C)
    )
    if checks.empty(B):
        CAUSAL_CONV1D_STEP.validate(implementation, config)
        return jnp.zeros((B, C), x.dtype), state
    return CAUSAL_CONV1D_STEP(
        implementation, x, state, weight, bias, activation=activation, config=config
    )
