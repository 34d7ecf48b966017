"""Short causal depthwise convolution in plain XLA: the oracle and ``lax.conv`` form.

Normalised arguments (see ``api.causal_conv1d``): x ``[B, T, C]``, weight ``[W, C]``, bias
``[C]`` or None, activation None or ``"silu"``, initial_state ``[B, W - 1, C]`` or None.
Both return ``(y [B, T, C] in x's dtype, final_state [B, W - 1, C] in x's dtype)``::

    y[t] = act(bias + sum_j weight[j] * x[t - W + 1 + j])

with the inputs before t = 0 taken from initial_state (zeros when None); the final state
is the last W - 1 inputs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from seqmix.kernels.checks import accum_dtype


def _with_history(x, initial_state, width):
    B, _, C = x.shape
    if initial_state is None:
        initial_state = jnp.zeros((B, width - 1, C), x.dtype)
    return jnp.concatenate([initial_state.astype(x.dtype), x], axis=1)


def _finish(y, bias, activation, acc, dtype):
    if bias is not None:
        y = y + bias.astype(acc)
    if activation == "silu":
        y = jax.nn.silu(y)
    return y.astype(dtype)


def causal_conv1d_naive(x, weight, bias, *, activation, initial_state):
    """A sum over the W taps, float32 inside."""
    acc = accum_dtype(x.dtype)
    W = weight.shape[0]
    T = x.shape[1]
    xp = _with_history(x, initial_state, W)
    xf = xp.astype(acc)
    y = sum(weight[j].astype(acc) * xf[:, j : j + T] for j in range(W))
    return _finish(y, bias, activation, acc, x.dtype), xp[:, xp.shape[1] - (W - 1) :]


def causal_conv1d_xla(x, weight, bias, *, activation, initial_state):
    """``lax.conv_general_dilated`` with one group per channel."""
    acc = accum_dtype(x.dtype)
    W, C = weight.shape
    xp = _with_history(x, initial_state, W)
    y = lax.conv_general_dilated(
        xp.astype(acc),
        weight.astype(acc)[:, None, :],
        window_strides=(1,),
        padding="VALID",
        dimension_numbers=("NWC", "WIO", "NWC"),
        feature_group_count=C,
    )
    return _finish(y, bias, activation, acc, x.dtype), xp[:, xp.shape[1] - (W - 1) :]


def causal_conv1d_step_reference(x, state, weight, bias, *, activation):
    """One token: x ``[B, C]``, state ``[B, W - 1, C]`` -> ``(y [B, C], new_state)``."""
    y, new_state = causal_conv1d_naive(
        x[:, None], weight, bias, activation=activation, initial_state=state
    )
    return y[:, 0], new_state


def final_state(x, initial_state, W):
    """The last W - 1 rows of ``[initial_state; x]`` in x's dtype (plain XLA slicing)."""
    B, T, C = x.shape
    if T >= W - 1:
        return x[:, T - (W - 1) :]
    prev = (
        jnp.zeros((B, W - 1, C), x.dtype)
        if initial_state is None
        else initial_state.astype(x.dtype)
    )
    return jnp.concatenate([prev[:, T:], x], axis=1)
