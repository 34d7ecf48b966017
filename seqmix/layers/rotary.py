"""Rotary position embedding (RoPE), rotate-half (GPT-NeoX) layout."""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def apply_rotary(x: Array, positions: Array, *, theta: float = 10000.0) -> Array:
    """Rotates pairs ``(x[..., i], x[..., i + D/2])`` by ``positions * theta^(-2i/D)``.

    Args:
      x: ``[B, T, H, D]`` with ``D`` even.
      positions: ``[B, T]`` ints.

    Returns:
      ``[B, T, H, D]`` in x's dtype (computed in float32).
    """
    D = x.shape[-1]
    if D % 2:
        raise ValueError(f"rotary embedding needs an even head_dim, got {D}")
    half = D // 2
    inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angle = positions.astype(jnp.float32)[:, :, None, None] * inv_freq  # [B, T, 1, D/2]
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    xf = x.astype(jnp.float32)
    x1, x2 = xf[..., :half], xf[..., half:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)
