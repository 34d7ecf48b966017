"""The sequence classifier: a bidirectional encoder, mean-pooled over the real tokens."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from seqmix import checks
from seqmix.layers import Head
from seqmix.layers.base import compute_dtype
from seqmix.models.backbone import Backbone

Array = jax.Array


class SequenceClassifier(nnx.Module):
    """``model(tokens, *, segment_ids=None, mask=None)`` -> float32 logits
    ``[B, num_classes]``.

    Every mixer is bidirectional (attention without the causal mask; recurrent mixers as a
    forward plus a reversed pass). ``mask [B, T]`` (bool, True for real tokens) defaults to
    ``tokens != config.pad_id`` (all True when ``pad_id`` is None). Hidden states are
    averaged over the real tokens (float32), then ``head [d_model, num_classes]``.

    Padding is kept out of the real tokens' context: unless ``segment_ids`` are given they
    are ``mask`` as ints (padding 0, tokens 1), so padding must be contiguous (at the end
    or at the start of a row). One sequence per row.
    """

    def __init__(self, config, *, rngs: nnx.Rngs):
        num_classes = checks.positive_int(config.num_classes, "num_classes")
        pad_id = checks.optional_int(config.pad_id, "pad_id", minimum=0)
        self.backbone = Backbone(config, causal=False, rngs=rngs)
        self.num_classes = num_classes
        self.pad_id = pad_id
        self.head = Head(
            int(config.d_model),
            num_classes,
            axis=None,
            dtype=compute_dtype(config.dtype),
            rngs=rngs,
        )

    @property
    def layer_names(self) -> tuple[str, ...]:
        return self.backbone.layer_names

    def __call__(
        self, tokens: Array, *, segment_ids: Array | None = None, mask: Array | None = None
    ) -> Array:
        if mask is None and self.pad_id is not None:
            mask = tokens != self.pad_id
        if mask is not None:
            if mask.shape != tokens.shape:
                raise ValueError(
                    f"mask must have the shape of tokens {tokens.shape}, got {mask.shape}"
                )
            mask = mask.astype(bool)
            if segment_ids is None:
                segment_ids = mask.astype(jnp.int32)
        h = self.backbone(tokens, segment_ids=segment_ids)
        if mask is None:
            pooled = jnp.mean(h, axis=1)
        else:
            w = mask.astype(jnp.float32)[..., None]
            pooled = jnp.sum(h * w, axis=1) / jnp.maximum(jnp.sum(w, axis=1), 1.0)
        return self.head(pooled)
