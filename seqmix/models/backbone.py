"""Embedding, a stack of pre-norm blocks (one mixer each) and the final norm."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from seqmix import checks
from seqmix.kernels import dispatch
from seqmix.layers import Block, Embedding, RMSNorm
from seqmix.layers.base import cache_sizes, compute_dtype
from seqmix.models.config import layer_names
from seqmix.models.registry import build_mixer

Array = jax.Array


class Backbone(nnx.Module):
    """``tokens [B, T]`` -> hidden states ``[B, T, d_model]`` (float32, after the final
    RMSNorm). Layer ``i`` is ``Block(mixer_i, mlp)`` with ``mixer_i`` named by
    ``config.layers`` and configured by ``config.mixers.<name>``."""

    def __init__(self, config, *, causal: bool, rngs: nnx.Rngs):
        names = layer_names(config)
        d_model = checks.positive_int(config.d_model, "d_model")
        vocab_size = checks.positive_int(config.vocab_size, "vocab_size")
        dtype = compute_dtype(config.dtype)
        norm_eps = checks.positive_float(config.norm_eps, "norm_eps")
        dispatch.check_implementation(config.get("implementation"), "implementation")
        mlp = config.mlp
        self.layer_names = names
        self.d_model = d_model
        self.embed = Embedding(vocab_size, d_model, dtype=dtype, rngs=rngs)
        blocks = []
        for i, name in enumerate(names):
            try:
                mixer = build_mixer(name, config, causal=causal, rngs=rngs)
            except ValueError as e:
                raise ValueError(f"layer {i} ({name}): {e}") from None
            blocks.append(
                Block(
                    mixer,
                    d_model,
                    mlp_type=mlp.type,
                    expansion=mlp.expansion,
                    multiple_of=mlp.get("multiple_of", 8),
                    hidden_features=mlp.get("hidden_size"),
                    norm_eps=norm_eps,
                    dtype=dtype,
                    rngs=rngs,
                )
            )
        self.layers = nnx.List(blocks)
        self.final_norm = RMSNorm(d_model, eps=norm_eps, dtype="float32", rngs=rngs)

    def __call__(self, tokens: Array, *, segment_ids: Array | None = None, cache=None):
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(
                f"tokens must be an int array [batch, time], got {tokens.dtype}{list(tokens.shape)}"
            )
        if segment_ids is not None and segment_ids.shape != tokens.shape:
            raise ValueError(
                f"segment_ids must have the shape of tokens {tokens.shape}, got {segment_ids.shape}"
            )
        if cache is not None and len(cache) != len(self.layers):
            raise ValueError(
                f"cache has {len(cache)} layer caches; the model has "
                f"{len(self.layers)} layers (use model.init_cache)"
            )
        x = self.embed(tokens)
        new_cache = []
        for i, layer in enumerate(self.layers):
            if cache is None:
                x = layer(x, segment_ids=segment_ids)
            else:
                x, layer_cache = layer(x, cache=cache[i])
                new_cache.append(layer_cache)
        x = self.final_norm(x)
        return x if cache is None else (x, tuple(new_cache))

    def init_cache(self, batch_size: int, max_length: int) -> tuple:
        batch_size, max_length = cache_sizes(batch_size, max_length)
        return tuple(layer.init_cache(batch_size, max_length) for layer in self.layers)
