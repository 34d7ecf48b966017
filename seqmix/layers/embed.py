"""Token embedding and the output head (tied to the embedding or its own kernel)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from seqmix import checks
from seqmix.layers.params import lecun_normal, param

Array = jax.Array


class Embedding(nnx.Module):
    """``embedding [vocab, d_model]`` (axes ``("vocab", "embed")``), normal with standard
    deviation ``d_model^-0.5`` so that a tied head gives unit-variance logits."""

    def __init__(self, vocab_size: int, d_model: int, *, dtype="float32", rngs: nnx.Rngs):
        vocab_size = checks.positive_int(vocab_size, "vocab_size")
        d_model = checks.positive_int(d_model, "d_model")
        self.vocab_size = vocab_size
        self.dtype = jnp.dtype(dtype).name
        self.embedding = param(
            rngs,
            jax.nn.initializers.normal(d_model**-0.5),
            (vocab_size, d_model),
            ("vocab", "embed"),
        )

    def __call__(self, tokens: Array) -> Array:
        """int ``[B, T]`` -> ``[B, T, d_model]`` in the compute dtype.

        Token ids must lie in ``[0, vocab_size)``: checked when ``tokens`` are concrete (a
        ValueError naming the first bad position); traced under ``jit`` they are checked only
        inside ``seqmix.checks.traced_checks()`` with ``checkify`` (an id out of range would
        otherwise read a NaN row, or wrap around when negative)."""
        if not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"tokens must be an integer array, got {tokens.dtype}")
        checks.token_range(tokens, self.vocab_size)
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
