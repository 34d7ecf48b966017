"""BASED: Taylor linear attention plus sliding-window softmax attention in one mixer."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from seqmix.layers.attention import Attention
from seqmix.layers.base import COMMON, Mixer, common_key, optional_size, size
from seqmix.layers.linear_attention import TAYLOR_MAPS, LinearAttention
from seqmix.layers.params import Dense

Array = jax.Array

COMBINES = ("sum", "concat")


class Based(Mixer):
    """BASED (Arora et al. 2024), registered as ``based``.

    Two branches over the same input: normalised linear attention with the second-order
    Taylor feature map (``num_heads`` heads, q/k of ``feature_dim`` before the map;
    ``feature_map`` "taylor_symmetric", the default, or "taylor": the same kernel, see
    ``seqmix.layers.linear_attention``) and
    causal softmax attention over a sliding window of ``window_size`` past tokens
    (``window_heads`` heads, RoPE). ``combine="sum"`` adds the two projected outputs;
    ``"concat"`` concatenates their heads and projects once.

    Decoding cache: ``{"linear": LinearAttention's cache, "window": Attention's ring-buffer
    cache of window_size + 1 keys}``: constant memory in the sequence length.
    """

    @classmethod
    def default_config(cls) -> ml_collections.ConfigDict:
        return ml_collections.ConfigDict(
            {
                "num_heads": 4,
                "head_dim": None,  # value dim per head of the linear branch; None: d_model // heads
                "feature_dim": 16,
                # "taylor_symmetric": the kernel of "taylor" from its d (d + 1) / 2 distinct
                # products (153 features at feature_dim 16, not 273): the same outputs, a 44%
                # smaller state and less work in the chunked kernels
                "feature_map": "taylor_symmetric",
                "window_size": 64,
                "window_heads": None,  # None: num_heads
                "combine": "sum",
                "short_conv": False,
                "conv_width": 4,
                "chunk_size": 64,
            }
        )

    def __init__(self, config, *, rngs: nnx.Rngs):
        self._common(config)
        if config.combine not in COMBINES:
            raise ValueError(f"combine must be one of {COMBINES}, got {config.combine!r}")
        window_size = size(config, "window_size", minimum=0)
        size(config, "feature_dim")
        optional_size(config, "window_heads")
        if config.feature_map not in TAYLOR_MAPS:
            raise ValueError(
                f"feature_map must be one of {TAYLOR_MAPS}, got {config.feature_map!r}"
            )
        self.combine = str(config.combine)
        common = {key: common_key(config, key) for key in COMMON}
        linear = LinearAttention.default_config()
        linear.update(common)
        linear.update(
            {
                "num_heads": config.num_heads,
                "head_dim": config.head_dim,
                "key_dim": config.feature_dim,
                "feature_map": config.feature_map,
                "normalize": True,
                "short_conv": config.short_conv,
                "conv_width": config.conv_width,
                "chunk_size": config.chunk_size,
            }
        )
        window = Attention.default_config()
        window.update(common)
        window.update(
            {
                "num_heads": config.num_heads
                if config.window_heads is None
                else config.window_heads,
                "local_window_size": window_size,
            }
        )
        project = self.combine == "sum"
        self.linear = LinearAttention(linear, rngs=rngs, project_output=project)
        self.window = Attention(window, rngs=rngs, project_output=project)
        self.o_proj = (
            None
            if project
            else Dense(
                self.linear.output_features + self.window.output_features,
                self.d_model,
                ("heads", "embed"),
                rngs=rngs,
                dtype=self.dtype,
            )
        )

    def init_cache(self, batch_size: int, max_length: int) -> dict:
        return {
            "linear": self.linear.init_cache(batch_size, max_length),
            "window": self.window.init_cache(batch_size, max_length),
        }

    def __call__(self, x: Array, *, segment_ids: Array | None = None, cache=None):
        self._check_call(x, segment_ids, cache)
        if cache is None:
            a = self.linear(x, segment_ids=segment_ids)
            b = self.window(x, segment_ids=segment_ids)
        else:
            a, cache_a = self.linear(x, cache=cache["linear"])
            b, cache_b = self.window(x, cache=cache["window"])
        if self.o_proj is None:
            y = a + b
        else:
            y = self.o_proj(jnp.concatenate([a, b], axis=-1))
        return y if cache is None else (y, {"linear": cache_a, "window": cache_b})
