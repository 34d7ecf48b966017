"""Token embedding and the output head (tied to the embedding or its own kernel)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from seqmix.layers.params import lecun_normal, param

Array = jax.Array


class Embedding(nnx.Module):
    """``embedding [vocab, d_model]`` (axes ``("vocab", "embed")``), normal with standard
    deviation ``d_model^-0.5`` so that a tied head gives unit-variance logits."""

    def __init__(self, vocab_size: int, d_model: int, *, dtype="float32", rngs: nnx.Rngs):
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
        self.vocab_size = int(vocab_size)
        self.dtype = jnp.dtype(dtype).name
        self.embedding = param(
            rngs,
            jax.nn.initializers.normal(d_model**-0.5),
            (vocab_size, d_model),
            ("vocab", "embed"),
        )

    def __call__(self, tokens: Array) -> Array:
        """int ``[B, T]`` -> ``[B, T, d_model]`` in the compute dtype."""
        if not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"tokens must be an integer array, got {tokens.dtype}")
        return jnp.take(self.embedding[...], tokens, axis=0).astype(self.dtype)

    def attend(self, x: Array) -> Array:
        """Tied head: ``x @ embedding^T`` -> float32 logits ``[..., vocab]``."""
        dtype = jnp.dtype(self.dtype)
        return jnp.einsum(
            "...d,vd->...v",
            x.astype(dtype),
            self.embedding[...].astype(dtype),
            preferred_element_type=jnp.float32,
        )


class Head(nnx.Module):
    """Untied head: ``x @ kernel`` with ``kernel [d_model, out]`` (axes ``("embed", axis)``),
    float32 logits."""

    def __init__(
        self,
        d_model: int,
        out_features: int,
        *,
        axis: str | None = "vocab",
        dtype="float32",
        rngs: nnx.Rngs,
    ):
        self.dtype = jnp.dtype(dtype).name
        self.kernel = param(rngs, lecun_normal(), (d_model, out_features), ("embed", axis))

    def __call__(self, x: Array) -> Array:
        dtype = jnp.dtype(self.dtype)
        return jnp.einsum(
            "...d,dv->...v",
            x.astype(dtype),
            self.kernel[...].astype(dtype),
            preferred_element_type=jnp.float32,
        )
