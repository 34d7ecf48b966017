"""The causal language model: next-token logits, and decoding with explicit caches."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from seqmix import checks
from seqmix.layers import Head
from seqmix.layers.base import compute_dtype
from seqmix.models.backbone import Backbone

Array = jax.Array


class CausalLM(nnx.Module):
    """``model(tokens, *, segment_ids=None, cache=None)``: int ``tokens [B, T]`` -> float32
    logits ``[B, T, vocab_size]``, or ``(logits, new_cache)`` when a cache is given.

    With a cache (``model.init_cache(batch_size, max_length)``: a tuple with one pytree per
    layer) the tokens continue the cached sequences (one or more per call, every row
    advancing by ``T``); ``segment_ids`` must then be None. Without one, ``segment_ids``
    packs several sequences per row.
    """

    def __init__(self, config, *, rngs: nnx.Rngs):
        self.backbone = Backbone(config, causal=True, rngs=rngs)
        self.vocab_size = checks.positive_int(config.vocab_size, "vocab_size")
        self.max_length = checks.positive_int(config.max_length, "max_length")
        self.head = (
            None
            if config.tie_embeddings
            else Head(
                int(config.d_model), self.vocab_size, dtype=compute_dtype(config.dtype), rngs=rngs
            )
        )

    @property
    def layer_names(self) -> tuple[str, ...]:
        return self.backbone.layer_names

    def __call__(
        self,
        tokens: Array,
        *,
        segment_ids: Array | None = None,
        cache=None,
        positions: Array | None = None,
    ):
        """Logits ``[B, T, vocab]``; with ``positions`` (int ``[B, P]``, each in ``[0, T)``,
        checked when concrete) only those rows' ``[B, P, vocab]`` (a loss on a few positions
        then skips the others' projection). Token ids must lie in ``[0, vocab_size)``
        (``seqmix.layers.Embedding``)."""
        if positions is not None:
            positions = _check_positions(positions, tokens)
        out = self.backbone(tokens, segment_ids=segment_ids, cache=cache)
        h, new_cache = (out, None) if cache is None else out
        if positions is not None:
            h = jnp.take_along_axis(h, positions[..., None].astype(jnp.int32), axis=1)
        logits = self.backbone.embed.attend(h) if self.head is None else self.head(h)
        return logits if cache is None else (logits, new_cache)

    def init_cache(self, batch_size: int, max_length: int | None = None) -> tuple:
        """Empty decoding caches for ``batch_size`` rows of up to ``max_length`` tokens
        (default ``config.max_length``). Recurrent caches have a fixed size; a full-length
        attention cache holds ``max_length`` keys, and past that it keeps only the last
        ``max_length`` (a ring buffer: attention becomes a sliding window)."""
        return self.backbone.init_cache(
            batch_size, self.max_length if max_length is None else max_length
        )


def _check_positions(positions, tokens):
    """``positions`` as an int array ``[B, P]`` of indices into ``tokens [B, T]``."""
    if not hasattr(positions, "shape"):
        positions = jnp.asarray(positions)
    B, T = tokens.shape[0], tokens.shape[-1]
    if (
        positions.ndim != 2
        or positions.shape[0] != B
        or not jnp.issubdtype(positions.dtype, jnp.integer)
    ):
        raise ValueError(
            f"positions must be an int array [batch, P] with batch {B}, got "
            f"{positions.dtype}{list(positions.shape)}"
        )
    if checks.is_concrete(positions):
        checks.id_range(positions, T, "positions", "the sequence length")
    return positions
