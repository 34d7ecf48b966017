"""Linear attention, RetNet and GLA: configurations of one gated linear-attention mixer.

``S_t = exp(g_t) * S_{t-1} + phi(k_t) v_t^T``, ``o_t = scale * phi(q_t)^T S_t`` through
``seqmix.kernels.linear_attention`` (chunked; ``linear_attention_step`` for one token), with
``g`` the log decay:

- ``decay="none"``: ``g = 0`` (linear attention, Katharopoulos et al.);
- ``decay="fixed"``: ``g_h = log(1 - 2^(-5 - h))`` per head (RetNet);
- ``decay="data"``: ``g = logsigmoid(x W1 W2 + b) / gate_normalizer`` per key channel, a
  low-rank data-dependent gate (GLA).

Feature maps ``phi``: ``identity``, ``elu1`` (``elu(x) + 1``), ``relu``, ``taylor``
(BASED's second-order Taylor expansion of ``exp(q.k / sqrt(d))``:
``phi(x) = [1, x / d^(1/4), vec(x x^T) / sqrt(2 d)]`` of size ``1 + d + d^2``) and
``taylor_symmetric``, the same kernel ``phi(q).phi(k) = 1 + s + s^2 / 2`` from the
``d (d + 1) / 2`` distinct products (``x_i^2 / sqrt(2 d)`` and ``x_i x_j / sqrt(d)`` for
``i < j``): size ``1 + d + d (d + 1) / 2``, 153 instead of 273 at ``d = 16``, so the state
and the chunked kernels' key width shrink by 44%.
Options: ``normalize`` (divide by ``phi(q)^T sum phi(k)``), a short causal conv (silu) on
q/k/v before the feature map, RoPE on q/k, an RMS output norm per head and an output gate
``o * silu(x Wg)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from seqmix import checks, kernels, parallel
from seqmix.layers import segments
from seqmix.layers.base import Mixer, cache_sizes, divide, optional_size, size
from seqmix.layers.conv import ShortConv
from seqmix.layers.norms import RMSNorm
from seqmix.layers.params import Dense
from seqmix.layers.rotary import apply_rotary

Array = jax.Array

FEATURE_MAPS = ("identity", "elu1", "relu", "taylor", "taylor_symmetric")
TAYLOR_MAPS = ("taylor", "taylor_symmetric")
DECAYS = ("none", "fixed", "data")


def feature_dim(feature_map: str, key_dim: int) -> int:
    if feature_map == "taylor":
        return 1 + key_dim + key_dim * key_dim
    if feature_map == "taylor_symmetric":
        return 1 + key_dim + key_dim * (key_dim + 1) // 2
    return key_dim


def apply_feature_map(x: Array, feature_map: str) -> Array:
    """``phi(x)`` over the last axis, in x's dtype (float32 inside)."""
    if feature_map == "identity":
        return x
    xf = x.astype(jnp.float32)
    if feature_map == "elu1":
        y = jax.nn.elu(xf) + 1.0
    elif feature_map == "relu":
        y = jax.nn.relu(xf)
    elif feature_map in TAYLOR_MAPS:
        d = x.shape[-1]
        if feature_map == "taylor":
            second = (xf[..., :, None] * xf[..., None, :]).reshape(x.shape[:-1] + (d * d,))
            second = second * (2.0 * d) ** -0.5
        else:  # each product once; an off-diagonal one stands for its mirror: sqrt(2) more
            i, j = np.triu_indices(d)
            weight = np.where(i == j, (2.0 * d) ** -0.5, d**-0.5).astype(np.float32)
            second = xf[..., i] * xf[..., j] * weight
        y = jnp.concatenate(
            [jnp.ones(x.shape[:-1] + (1,), jnp.float32), xf * d**-0.25, second], axis=-1
        )
    else:
        raise ValueError(f"feature_map must be one of {FEATURE_MAPS}, got {feature_map!r}")
    return y.astype(x.dtype)


def retnet_log_decay(num_heads: int) -> Array:
    """``log(1 - 2^(-5 - h))`` for ``h = 0 .. num_heads - 1``, float32 ``[num_heads]``."""
    h = jnp.arange(num_heads, dtype=jnp.float32)
    return jnp.log1p(-jnp.exp2(-5.0 - h))


class LinearAttention(Mixer):
    """Gated linear attention, registered as ``linear_attention`` (and, with other defaults,
    ``retnet`` and ``gla``). See the module docstring for the formula.

    Projections: q, k ``[d_model, num_heads * key_dim]`` axes ``("embed", "heads")``; v and
    the gate ``[d_model, num_heads * head_dim]``; o ``[num_heads * head_dim, d_model]``;
    q, k, v and o have biases with ``use_bias``.

    Decoding cache: ``{"state": float32 [B, H, F, head_dim (+1 when normalize)], "conv":
    [B, conv_width - 1, C] (with short_conv), "lengths": [B] int32}`` with ``F`` the
    feature dim.
    """

    @classmethod
    def default_config(cls) -> ml_collections.ConfigDict:
        return ml_collections.ConfigDict(
            {
                "num_heads": 4,
                "head_dim": None,  # value dim per head; None: d_model // num_heads
                "key_dim": None,  # q/k dim per head before the feature map; None: head_dim
                "feature_map": "elu1",
                "normalize": True,
                "decay": "none",  # "none" | "fixed" (RetNet) | "data" (GLA)
                "gate_low_rank_dim": 16,
                "gate_normalizer": 16.0,
                "short_conv": False,
                "conv_width": 4,
                "output_gate": False,
                "output_norm": False,
                "rope": False,
                "rope_theta": 10000.0,
                "scale": None,  # None: 1 for the taylor maps, key_dim ** -0.5 otherwise
                "chunk_size": 64,
                "use_bias": False,  # biases on the q, k, v and o projections
            }
        )

    def __init__(self, config, *, rngs: nnx.Rngs, project_output: bool = True):
        self._common(config)
        H = size(config, "num_heads")
        Dv = optional_size(config, "head_dim")
        if Dv is None:
            Dv = divide(self.d_model, H, "d_model", "num_heads")
        Dk = size(config, "key_dim", default=Dv)
        if config.feature_map not in FEATURE_MAPS:
            raise ValueError(
                f"feature_map must be one of {FEATURE_MAPS}, got {config.feature_map!r}"
            )
        if config.decay not in DECAYS:
            raise ValueError(f"decay must be one of {DECAYS}, got {config.decay!r}")
        if config.rope and Dk % 2:
            raise ValueError(f"key_dim ({Dk}) must be even for rope")
        self.num_heads, self.head_dim, self.key_dim = H, Dv, Dk
        self.feature_map = str(config.feature_map)
        self.feature_dim = feature_dim(self.feature_map, Dk)
        self.normalize = bool(config.normalize)
        self.decay = str(config.decay)
        self.gate_normalizer = checks.positive_float(config.gate_normalizer, "gate_normalizer")
        self.rope = bool(config.rope)
        self.rope_theta = checks.positive_float(config.rope_theta, "rope_theta")
        self.scale = (
            checks.as_float(config.scale, "scale")
            if config.scale is not None
            else (1.0 if self.feature_map in TAYLOR_MAPS else Dk**-0.5)
        )
        self.chunk_size = size(config, "chunk_size")
        kw = dict(rngs=rngs, dtype=self.dtype)
        bias = bool(config.get("use_bias", False))
        self.q_proj = Dense(self.d_model, H * Dk, ("embed", "heads"), use_bias=bias, **kw)
        self.k_proj = Dense(self.d_model, H * Dk, ("embed", "heads"), use_bias=bias, **kw)
        self.v_proj = Dense(self.d_model, H * Dv, ("embed", "heads"), use_bias=bias, **kw)
        self.conv = (
            ShortConv(
                H * (2 * Dk + Dv),
                size(config, "conv_width"),
                dtype=self.dtype,
                implementation=self.implementation,
                rngs=rngs,
            )
            if config.short_conv
            else None
        )
        if self.decay == "data":
            r = size(config, "gate_low_rank_dim")
            self.gate_down = Dense(self.d_model, r, ("embed", None), **kw)
            self.gate_up = Dense(r, H * self.feature_dim, (None, "heads"), use_bias=True, **kw)
        else:
            self.gate_down = self.gate_up = None
        self.out_norm = (
            RMSNorm(Dv, eps=self.norm_eps, dtype=self.dtype, axis=None, rngs=rngs)
            if config.output_norm
            else None
        )
        self.g_proj = (
            Dense(self.d_model, H * Dv, ("embed", "heads"), **kw) if config.output_gate else None
        )
        self.o_proj = (
            Dense(H * Dv, self.d_model, ("heads", "embed"), use_bias=bias, **kw)
            if project_output
            else None
        )

    @property
    def output_features(self) -> int:
        return self.num_heads * self.head_dim

    def init_cache(self, batch_size: int, max_length: int) -> dict[str, Array]:
        batch_size, _ = cache_sizes(batch_size, max_length)  # a recurrent state: fixed size
        V = self.head_dim + (1 if self.normalize else 0)
        cache = {
            "state": jnp.zeros((batch_size, self.num_heads, self.feature_dim, V), jnp.float32),
            "lengths": jnp.zeros((batch_size,), jnp.int32),
        }
        if self.conv is not None:
            cache["conv"] = self.conv.init_state(batch_size)
        return cache

    def _log_decay(self, x: Array) -> Array | None:
        B, T, _ = x.shape
        if self.decay == "none":
            return None
        if self.decay == "fixed":
            return jnp.broadcast_to(retnet_log_decay(self.num_heads), (B, T, self.num_heads))
        logits = self.gate_up(self.gate_down(x)).astype(jnp.float32)
        g = jax.nn.log_sigmoid(logits) / self.gate_normalizer
        return g.reshape(B, T, self.num_heads, self.feature_dim)

    def __call__(self, x: Array, *, segment_ids: Array | None = None, cache=None):
        self._check_call(x, segment_ids, cache)
        B, T, _ = x.shape
        H, Dk, Dv = self.num_heads, self.key_dim, self.head_dim
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        new_cache = {}
        if self.conv is not None:
            qkv = jnp.concatenate([q, k, v], axis=-1)
            if cache is None:
                qkv = self.conv(qkv, segment_ids=segment_ids)
            elif T == 1:
                y, new_cache["conv"] = self.conv.step(qkv[:, 0], cache["conv"])
                qkv = y[:, None]
            else:
                qkv, new_cache["conv"] = self.conv(qkv, state=cache["conv"])
            q, k, v = jnp.split(qkv, [H * Dk, 2 * H * Dk], axis=-1)
        q, k = q.reshape(B, T, H, Dk), k.reshape(B, T, H, Dk)
        v = v.reshape(B, T, H, Dv)
        if self.rope:
            pos = segments.positions(B, T, segment_ids, None if cache is None else cache["lengths"])
            q = apply_rotary(q, pos, theta=self.rope_theta)
            k = apply_rotary(k, pos, theta=self.rope_theta)
        q = apply_feature_map(q, self.feature_map)
        k = apply_feature_map(k, self.feature_map)
        g = self._log_decay(x)
        if cache is None:
            o = parallel.linear_attention(
                q,
                k,
                v,
                g,
                scale=self.scale,
                segment_ids=segment_ids,
                normalize=self.normalize,
                chunk_size=self.chunk_size,
                implementation=self.impl("linear_attention"),
            )
        elif T == 1:
            o, new_cache["state"] = kernels.linear_attention_step(
                q[:, 0],
                k[:, 0],
                v[:, 0],
                cache["state"],
                None if g is None else g[:, 0],
                scale=self.scale,
                normalize=self.normalize,
                implementation=self.impl("linear_attention_step"),
            )
            o = o[:, None]
        else:
            o, new_cache["state"] = kernels.linear_attention(
                q,
                k,
                v,
                g,
                scale=self.scale,
                initial_state=cache["state"],
                return_final_state=True,
                normalize=self.normalize,
                chunk_size=self.chunk_size,
                implementation=self.impl("linear_attention"),
            )
        y = self._output(o, x)
        if cache is None:
            return y
        new_cache["lengths"] = cache["lengths"] + T
        return y, new_cache

    def _output(self, o: Array, x: Array) -> Array:
        B, T = o.shape[:2]
        if self.out_norm is not None:
            o = self.out_norm(o)
        o = o.reshape(B, T, self.num_heads * self.head_dim).astype(self.dtype)
        if self.g_proj is not None:
            o = (o * jax.nn.silu(self.g_proj(x).astype(jnp.float32))).astype(self.dtype)
        return o if self.o_proj is None else self.o_proj(o)


class RetNet(LinearAttention):
    """RetNet's multi-scale retention, registered as ``retnet``: identity feature map, a
    fixed decay ``1 - 2^(-5 - h)`` per head, RoPE, per-head RMS norm and a swish gate."""

    @classmethod
    def default_config(cls) -> ml_collections.ConfigDict:
        config = LinearAttention.default_config()
        config.update(
            {
                "feature_map": "identity",
                "normalize": False,
                "decay": "fixed",
                "rope": True,
                "output_norm": True,
                "output_gate": True,
            }
        )
        return config


class GLA(LinearAttention):
    """Gated linear attention (Yang et al. 2023), registered as ``gla``: identity feature
    map, data-dependent per-channel decay from a low-rank gate, RMS norm and swish gate."""

    @classmethod
    def default_config(cls) -> ml_collections.ConfigDict:
        config = LinearAttention.default_config()
        config.update(
            {
                "feature_map": "identity",
                "normalize": False,
                "decay": "data",
                "output_norm": True,
                "output_gate": True,
            }
        )
        return config
