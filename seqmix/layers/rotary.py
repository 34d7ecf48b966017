"""Rotary position embedding (RoPE), rotate-half (GPT-NeoX) layout, with Llama 3's
frequency scaling."""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp

Array = jax.Array

# rope_scaling types and the keys each one needs (besides ``rope_type``).
ROPE_SCALING = {
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}

RopeScaling = tuple[tuple[str, float | str], ...]


def rope_scaling_spec(scaling) -> RopeScaling | None:
    """A ``rope_scaling`` config value (None, or a mapping with ``rope_type`` and that
    type's keys, see ``ROPE_SCALING``) as a hashable tuple of sorted ``(key, value)`` pairs.

    Raises ValueError naming ``rope_scaling.rope_type`` for an unknown type, and the key
    for a missing or unknown one.
    """
    if scaling is None:
        return None
    if isinstance(scaling, tuple):  # already a spec
        scaling = dict(scaling)
    if not (isinstance(scaling, Mapping) or hasattr(scaling, "items")):
        raise ValueError(f"rope_scaling must be None or a mapping, got {scaling!r}")
    values = dict(scaling.items())
    kind = values.pop("rope_type", None)
    if kind is None:
        kind = values.pop("type", None)
    values.pop("type", None)
    if kind not in ROPE_SCALING:
        raise ValueError(
            f"rope_scaling.rope_type {kind!r} is not supported; supported: "
            f"{sorted(ROPE_SCALING)} (or rope_scaling None)"
        )
    need = ROPE_SCALING[kind]
    missing = sorted(set(need) - set(values))
    unknown = sorted(set(values) - set(need))
    if missing or unknown:
        raise ValueError(
            f"rope_scaling ({kind}): missing keys {missing}, unknown keys {unknown}; "
            f"expected exactly {list(need)}"
        )
    return (("rope_type", kind),) + tuple(sorted((k, float(values[k])) for k in need))


def rope_frequencies(
    head_dim: int, *, theta: float = 10000.0, scaling: RopeScaling | None = None
) -> Array:
    """The rotation frequencies ``theta^(-2i/D)``, ``i < D/2``, float32 ``[D/2]``.

    ``scaling`` (``rope_scaling_spec``) ``llama3``: with ``L = original_max_position_
    embeddings`` and wavelength ``w = 2 pi / f``, frequencies with ``w > L /
    low_freq_factor`` are divided by ``factor``, those with ``w < L / high_freq_factor``
    are kept, and in between they are interpolated:
    ``(1 - s) f / factor + s f`` with ``s = (L / w - low_freq_factor) / (high_freq_factor -
    low_freq_factor)``.
    """
    half = head_dim // 2
    inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    if scaling is None:
        return inv_freq
    s = dict(scaling)
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > old / low, inv_freq / factor, inv_freq)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old / high) & (wavelen <= old / low)
    return jnp.where(medium, smoothed, scaled).astype(jnp.float32)


def apply_rotary(
    x: Array, positions: Array, *, theta: float = 10000.0, scaling: RopeScaling | None = None
) -> Array:
    """Rotates pairs ``(x[..., i], x[..., i + D/2])`` by ``positions * f_i`` with ``f``
    from ``rope_frequencies(D, theta=theta, scaling=scaling)``: ``[x1 cos - x2 sin,
    x2 cos + x1 sin]`` (Hugging Face Llama's ``rotate_half`` convention).

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
    inv_freq = rope_frequencies(D, theta=theta, scaling=scaling)
    angle = positions.astype(jnp.float32)[:, :, None, None] * inv_freq  # [B, T, 1, D/2]
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    xf = x.astype(jnp.float32)
    x1, x2 = xf[..., :half], xf[..., half:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)
