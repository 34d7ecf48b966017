"""RMS normalisation, plain and gated (Mamba-2's ``norm(y * silu(z))``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from seqmix.layers.params import param

Array = jax.Array


def rms_normalize(x: Array, eps: float) -> Array:
    """``x / sqrt(mean(x^2, -1) + eps)`` in float32."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)


class RMSNorm(nnx.Module):
    """``y = x / rms(x) * scale`` over the last axis (float32 inside, output in ``dtype``).

    scale: float32 ``[features]`` initialised to ones, logical axes ``(axis,)``.
    """

    def __init__(
        self,
        features: int,
        *,
        eps: float = 1e-5,
        dtype="float32",
        axis: str | None = "embed",
        rngs: nnx.Rngs | None = None,
    ):
        self.eps = float(eps)
        self.dtype = jnp.dtype(dtype).name
        self.scale = param(rngs, jnp.ones((features,)), (features,), (axis,))

    def __call__(self, x: Array) -> Array:
        y = rms_normalize(x, self.eps) * self.scale[...]
        return y.astype(self.dtype)


class GatedRMSNorm(nnx.Module):
    """``RMSNorm(y * silu(z))`` with the norm taken over ``groups`` equal slices of the last
    axis (Mamba-2's ``RMSNormGated`` with ``group_size = features / groups``)."""

    def __init__(
        self,
        features: int,
        *,
        groups: int = 1,
        eps: float = 1e-5,
        dtype="float32",
        axis: str | None = "heads",
        rngs: nnx.Rngs | None = None,
    ):
        if features % groups:
            raise ValueError(
                f"GatedRMSNorm: features ({features}) must be divisible by groups ({groups})"
            )
        self.groups = int(groups)
        self.eps = float(eps)
        self.dtype = jnp.dtype(dtype).name
        self.scale = param(rngs, jnp.ones((features,)), (features,), (axis,))

    def __call__(self, y: Array, z: Array) -> Array:
        h = y.astype(jnp.float32) * jax.nn.silu(z.astype(jnp.float32))
        shape = h.shape
        group_size = shape[-1] // self.groups  # explicit: -1 is ambiguous for an empty batch
        h = rms_normalize(h.reshape(shape[:-1] + (self.groups, group_size)), self.eps)
        h = h.reshape(shape)
        return (h * self.scale[...]).astype(self.dtype)


def l2_normalize(x: Array, eps: float = 1e-6) -> Array:
    """``x / sqrt(sum(x^2, -1) + eps)`` over the last axis, float32 inside, in x's dtype."""
    xf = x.astype(jnp.float32)
    return (xf * jax.lax.rsqrt(jnp.sum(jnp.square(xf), axis=-1, keepdims=True) + eps)).astype(
        x.dtype
    )
