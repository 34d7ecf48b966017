"""Packed rows: positions within segments, segment starts, and time reversal.

``segment_ids [B, T]`` (ints) pack several sequences in one row; a segment is a maximal run
of equal ids, so every change of id starts a new sequence.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array


def segment_starts(segment_ids: Array) -> Array:
    """``[B, T]`` bool: True where a new segment starts (always at ``t = 0``)."""
    change = segment_ids[:, 1:] != segment_ids[:, :-1]
    return jnp.concatenate([jnp.ones_like(change[:, :1]), change], axis=1)


def positions(
    batch: int, length: int, segment_ids: Array | None = None, offset: Array | None = None
) -> Array:
    """``[B, T]`` int32 positions: ``offset[b] + t``, or the index within each segment."""
    t = jnp.arange(length, dtype=jnp.int32)[None, :]
    if segment_ids is not None:
        start = jnp.where(segment_starts(segment_ids), t, 0)
        return t - lax.cummax(start, axis=1)
    pos = jnp.broadcast_to(t, (batch, length))
    if offset is not None:
        pos = pos + offset.astype(jnp.int32)[:, None]
    return pos


def reverse(x: Array | None) -> Array | None:
    """Reverses the time axis (axis 1) of ``[B, T, ...]``; None stays None."""
    return None if x is None else jnp.flip(x, axis=1)
