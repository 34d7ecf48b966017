"""The bidirectional form of a recurrent (causal-only) mixer, for encoders."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from seqmix.layers import segments
from seqmix.layers.base import common_key, copy_config
from seqmix.layers.params import Dense

Array = jax.Array

COMBINES = ("sum", "concat")


class Bidirectional(nnx.Module):
    """``y = fwd(x) (+) reverse(bwd(reverse(x)))`` with two causal passes of ``mixer_cls``.

    ``reverse`` flips the time axis of the row; ``segment_ids`` are flipped with it, so the
    reversed pass reads every packed sequence backwards and still resets at segment starts
    (segments are contiguous, so flipping the row flips each one in place of another).
    ``combine="sum"`` adds the two outputs; ``"concat"`` projects ``[y_fwd, y_bwd]``
    (``[2 d_model, d_model]``, axes ``("heads", "embed")``). ``share_params=True`` uses one
    mixer for both directions (as Caduceus); by default each has its own parameters.

    Bidirectional mixers cannot decode: ``cache`` must be None.
    """

    def __init__(
        self, mixer_cls, config, *, rngs: nnx.Rngs, combine: str = "sum", share_params: bool = False
    ):
        if combine not in COMBINES:
            raise ValueError(f"bidirectional.combine must be one of {COMBINES}, got {combine!r}")
        inner = copy_config(config)
        inner.causal = True
        self.combine = combine
        self.d_model = int(common_key(config, "d_model"))
        self.fwd = mixer_cls(inner, rngs=rngs)
        self.bwd = None if share_params else mixer_cls(inner, rngs=rngs)
        self.proj = (
            Dense(
                2 * self.d_model,
                self.d_model,
                ("heads", "embed"),
                rngs=rngs,
                dtype=common_key(config, "dtype"),
            )
            if combine == "concat"
            else None
        )

    def __call__(self, x: Array, *, segment_ids: Array | None = None, cache=None) -> Array:
        if cache is not None:
            raise ValueError("cache: a bidirectional mixer cannot decode")
        y_f = self.fwd(x, segment_ids=segment_ids)
        bwd = self.fwd if self.bwd is None else self.bwd
        y_b = segments.reverse(bwd(segments.reverse(x), segment_ids=segments.reverse(segment_ids)))
        if self.proj is None:
            return y_f + y_b
        return self.proj(jnp.concatenate([y_f, y_b], axis=-1))

    def init_cache(self, batch_size: int, max_length: int):
        raise ValueError("a bidirectional mixer has no decoding cache")


def make_mixer(
    mixer_cls, config, *, rngs: nnx.Rngs, combine: str = "sum", share_params: bool = False
) -> nnx.Module:
    """``mixer_cls(config)``, or its bidirectional form when ``config.causal`` is False and
    the mixer is recurrent (attention is bidirectional by itself with ``causal=False``)."""
    if not common_key(config, "causal") and getattr(mixer_cls, "recurrent", True):
        return Bidirectional(
            mixer_cls, config, rngs=rngs, combine=combine, share_params=share_params
        )
    return mixer_cls(config, rngs=rngs)
