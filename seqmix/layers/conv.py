"""Short causal depthwise convolution (Mamba's conv, the q/k/v conv of linear attention)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from seqmix import checks, kernels, parallel
from seqmix.layers import segments
from seqmix.layers.base import implementation_for
from seqmix.layers.params import param

Array = jax.Array


class ShortConv(nnx.Module):
    """``y[t] = act(bias + sum_j weight[j] * x[t - W + 1 + j])`` per channel, causal.

    weight: float32 ``[W, C]`` axes ``("conv", axis)``; bias ``[C]`` axes ``(axis,)``; both
    initialised uniform in ``+-1/sqrt(W)`` (PyTorch's Conv1d default with groups = C).

    With ``segment_ids`` the taps that would reach into an earlier segment are removed, so
    each packed sequence starts from zero history, exactly as at ``t = 0``. The op
    ``seqmix.kernels.causal_conv1d`` computes the full convolution (float32) and the few
    cross-segment terms (at most ``W - 1`` per segment start) are subtracted.
    """

    def __init__(
        self,
        channels: int,
        width: int,
        *,
        use_bias: bool = True,
        activation: str | None = "silu",
        dtype="float32",
        implementation=None,
        axis: str | None = "heads",
        rngs: nnx.Rngs,
    ):
        width = checks.positive_int(width, "conv width")
        channels = checks.positive_int(channels, "conv channels")
        self.channels = channels
        self.width = width
        self.activation = activation
        self.dtype = jnp.dtype(dtype).name
        self.implementation = implementation
        bound = 1.0 / math.sqrt(width)
        init = jax.nn.initializers.uniform(2 * bound)

        def shifted(key, shape, dtype):
            return init(key, shape, dtype) - bound

        self.weight = param(rngs, shifted, (width, channels), ("conv", axis))
        self.bias = param(rngs, shifted, (channels,), (axis,)) if use_bias else None

    def init_state(self, batch_size: int) -> Array:
        """The conv tail of a fresh sequence: zeros ``[B, W - 1, C]`` in the compute dtype."""
        return jnp.zeros((batch_size, self.width - 1, self.channels), self.dtype)

    def _weights(self, dtype):
        w = self.weight[...].astype(dtype)
        b = None if self.bias is None else self.bias[...].astype(dtype)
        return w, b

    def __call__(
        self, x: Array, *, segment_ids: Array | None = None, state: Array | None = None
    ) -> Array | tuple[Array, Array]:
        """x ``[B, T, C]`` -> y (x's dtype); with ``state`` (the previous ``W - 1`` inputs)
        returns ``(y, new_state)``."""
        impl = implementation_for(self.implementation, "causal_conv1d")
        if segment_ids is None:
            w, b = self._weights(x.dtype)
            if state is None:
                return parallel.causal_conv1d(
                    x, w, b, activation=self.activation, implementation=impl
                )
            return kernels.causal_conv1d(
                x,
                w,
                b,
                activation=self.activation,
                initial_state=state.astype(x.dtype),
                return_final_state=True,
                implementation=impl,
            )
        if state is not None:
            raise ValueError("segment_ids cannot be combined with a conv state (decoding)")
        xf = x.astype(jnp.float32)
        w, b = self._weights(jnp.float32)
        y = parallel.causal_conv1d(xf, w, None, implementation=impl)
        pos = segments.positions(x.shape[0], x.shape[1], segment_ids)[..., None]
        T = x.shape[1]
        for s in range(1, min(self.width, T)):
            # tap weight[W - 1 - s] reads x[t - s], which lies before the segment when pos < s
            x_s = jnp.pad(xf, ((0, 0), (s, 0), (0, 0)))[:, :T]
            y = y - jnp.where(pos < s, w[self.width - 1 - s] * x_s, 0.0)
        if b is not None:
            y = y + b
        if self.activation == "silu":
            y = jax.nn.silu(y)
        return y.astype(x.dtype)

    def step(self, x: Array, state: Array) -> tuple[Array, Array]:
        """One token: x ``[B, C]``, state ``[B, W - 1, C]`` -> ``(y [B, C], new_state)``."""
        w, b = self._weights(x.dtype)
        return kernels.causal_conv1d_step(
            x,
            state.astype(x.dtype),
            w,
            b,
            activation=self.activation,
            implementation=implementation_for(self.implementation, "causal_conv1d_step"),
        )
