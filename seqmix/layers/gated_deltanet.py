"""Gated DeltaNet and DeltaNet: the delta rule as a mixer.

Per v head: ``S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T``,
``o_t = scale * S_t^T q_t`` through ``seqmix.kernels.gated_delta_rule`` (chunked;
``gated_delta_rule_step`` for one token), with

- ``q, k, v = silu(conv(x W_q)), silu(conv(x W_k)), silu(conv(x W_v))`` (short causal
  depthwise convs), q and k L2-normalised per head;
- ``beta = sigmoid(x W_b)`` per v head;
- ``g = -exp(A_log) * softplus(x W_a + dt_bias)`` per v head (Gated DeltaNet, Yang, Kautz,
  Hatamizadeh 2024), or ``g = 0`` (DeltaNet, ``decay=False``);
- ``out = W_o gated_rms_norm(o, x W_g)``: RMS norm per v head of ``o * silu(x W_g)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from seqmix import checks, kernels, parallel
from seqmix.layers.base import Mixer, cache_sizes, divide, optional_size, size
from seqmix.layers.conv import ShortConv
from seqmix.layers.mamba2 import dt_bias_init
from seqmix.layers.norms import GatedRMSNorm, l2_normalize
from seqmix.layers.params import Dense, param

Array = jax.Array


class GatedDeltaNet(Mixer):
    """Gated DeltaNet, registered as ``gated_deltanet`` (see the module docstring).

    ``H = num_heads`` q/k heads of ``Dk = head_dim`` (None: ``d_model // num_heads``);
    ``Hv = num_v_heads`` (None: H; a multiple of H: v head ``h`` reads q/k head
    ``h // (Hv / H)``) v heads of ``Dv = expand_v * Dk``. Projections: q, k
    ``[d_model, H * Dk]``, v and the output gate ``[d_model, Hv * Dv]``, beta and the decay
    input ``[d_model, Hv]``, all axes ``("embed", "heads")``; o ``[Hv * Dv, d_model]``.
    ``A`` starts uniform in ``A_init_range``; ``dt_bias`` makes ``softplus(dt_bias)``
    log-uniform in ``[dt_min, dt_max]`` (Mamba-2's initialisation).

    Decoding cache: ``{"state": float32 [B, Hv, Dk, Dv], "conv": [B, conv_size - 1,
    2 H Dk + Hv Dv], "lengths": [B] int32}``.
    """

    @classmethod
    def default_config(cls) -> ml_collections.ConfigDict:
        return ml_collections.ConfigDict(
            {
                "num_heads": 4,
                "num_v_heads": None,  # None: num_heads
                "head_dim": None,  # q/k dim per head; None: d_model // num_heads
                "expand_v": 2.0,  # value dim per head = expand_v * head_dim
                "decay": True,  # False: g = 0 (DeltaNet)
                "conv_size": 4,
                "conv_bias": False,
                "A_init_range": (1.0, 16.0),
                "dt_min": 1e-3,
                "dt_max": 0.1,
                "dt_init_floor": 1e-4,
                "qk_norm_eps": 1e-6,
                "scale": None,  # None: head_dim ** -0.5
                "chunk_size": 64,
            }
        )

    def __init__(self, config, *, rngs: nnx.Rngs):
        self._common(config)
        H = size(config, "num_heads")
        Hv = size(config, "num_v_heads", default=H)
        divide(Hv, H, "num_v_heads", "num_heads")
        Dk = optional_size(config, "head_dim")
        if Dk is None:
            Dk = divide(self.d_model, H, "d_model", "num_heads")
        Dv = checks.positive_float(config.expand_v, "expand_v") * Dk
        if Dv < 1 or Dv != int(Dv):
            raise ValueError(
                f"expand_v ({config.expand_v}) * head_dim ({Dk}) must be a positive integer"
            )
        Dv = int(Dv)
        self.num_heads, self.num_v_heads, self.key_dim, self.value_dim = H, Hv, Dk, Dv
        self.decay = bool(config.decay)
        self.qk_norm_eps = checks.positive_float(config.qk_norm_eps, "qk_norm_eps")
        self.scale = float(
            Dk**-0.5 if config.scale is None else checks.as_float(config.scale, "scale")
        )
        self.chunk_size = size(config, "chunk_size")
        kw = dict(rngs=rngs, dtype=self.dtype)
        self.q_proj = Dense(self.d_model, H * Dk, ("embed", "heads"), **kw)
        self.k_proj = Dense(self.d_model, H * Dk, ("embed", "heads"), **kw)
        self.v_proj = Dense(self.d_model, Hv * Dv, ("embed", "heads"), **kw)
        self.b_proj = Dense(self.d_model, Hv, ("embed", "heads"), **kw)
        self.g_proj = Dense(self.d_model, Hv * Dv, ("embed", "heads"), **kw)
        self.conv = ShortConv(
            2 * H * Dk + Hv * Dv,
            size(config, "conv_size"),
            use_bias=bool(config.conv_bias),
            dtype=self.dtype,
            implementation=self.implementation,
            rngs=rngs,
        )
        if self.decay:
            self.a_proj = Dense(self.d_model, Hv, ("embed", "heads"), **kw)
            lo, hi = (float(a) for a in config.A_init_range)
            if not 0 < lo <= hi:
                raise ValueError(f"A_init_range must satisfy 0 < low <= high, got {(lo, hi)}")

            def a_log_init(key, shape, dtype):
                return jnp.log(jax.random.uniform(key, shape, jnp.float32, lo, hi)).astype(dtype)

            self.A_log = param(rngs, a_log_init, (Hv,), ("heads",))
            self.dt_bias = param(
                rngs,
                dt_bias_init(config.dt_min, config.dt_max, config.dt_init_floor),
                (Hv,),
                ("heads",),
            )
        else:
            self.a_proj = self.A_log = self.dt_bias = None
        self.norm = GatedRMSNorm(Hv * Dv, groups=Hv, eps=self.norm_eps, dtype=self.dtype, rngs=rngs)
        self.o_proj = Dense(Hv * Dv, self.d_model, ("heads", "embed"), **kw)

    def init_cache(self, batch_size: int, max_length: int) -> dict[str, Array]:
        batch_size, _ = cache_sizes(batch_size, max_length)  # a recurrent state: fixed size
        return {
            "state": jnp.zeros(
                (batch_size, self.num_v_heads, self.key_dim, self.value_dim), jnp.float32
            ),
            "conv": self.conv.init_state(batch_size),
            "lengths": jnp.zeros((batch_size,), jnp.int32),
        }

    def _log_decay(self, x: Array) -> Array | None:
        """``-exp(A_log) * softplus(x W_a + dt_bias)``, float32 ``[B, T, Hv]``."""
        if not self.decay:
            return None
        a = self.a_proj(x).astype(jnp.float32) + self.dt_bias[...]
        return -jnp.exp(self.A_log[...]) * jax.nn.softplus(a)

    def __call__(self, x: Array, *, segment_ids: Array | None = None, cache=None):
        self._check_call(x, segment_ids, cache)
        B, T, _ = x.shape
        H, Hv, Dk, Dv = self.num_heads, self.num_v_heads, self.key_dim, self.value_dim
        qkv = jnp.concatenate([self.q_proj(x), self.k_proj(x), self.v_proj(x)], axis=-1)
        new_cache = {}
        if cache is None:
            qkv = self.conv(qkv, segment_ids=segment_ids)
        elif T == 1:
            y, new_cache["conv"] = self.conv.step(qkv[:, 0], cache["conv"])
            qkv = y[:, None]
        else:
            qkv, new_cache["conv"] = self.conv(qkv, state=cache["conv"])
        q, k, v = jnp.split(qkv, [H * Dk, 2 * H * Dk], axis=-1)
        q = l2_normalize(q.reshape(B, T, H, Dk), self.qk_norm_eps)
        k = l2_normalize(k.reshape(B, T, H, Dk), self.qk_norm_eps)
        v = v.reshape(B, T, Hv, Dv)
        beta = jax.nn.sigmoid(self.b_proj(x).astype(jnp.float32))
        g = self._log_decay(x)
        if cache is None:
            o = parallel.gated_delta_rule(
                q,
                k,
                v,
                beta,
                g,
                segment_ids=segment_ids,
                chunk_size=self.chunk_size,
                implementation=self.impl("gated_delta_rule"),
                scale=self.scale,
            )
        elif T == 1:
            o, new_cache["state"] = kernels.gated_delta_rule_step(
                q[:, 0],
                k[:, 0],
                v[:, 0],
                beta[:, 0],
                cache["state"],
                None if g is None else g[:, 0],
                implementation=self.impl("gated_delta_rule_step"),
                scale=self.scale,
            )
            o = o[:, None]
        else:
            o, new_cache["state"] = kernels.gated_delta_rule(
                q,
                k,
                v,
                beta,
                g,
                initial_state=cache["state"],
                return_final_state=True,
                chunk_size=self.chunk_size,
                implementation=self.impl("gated_delta_rule"),
                scale=self.scale,
            )
        y = self.o_proj(self.norm(o.reshape(B, T, Hv * Dv), self.g_proj(x)))
        if cache is None:
            return y
        new_cache["lengths"] = cache["lengths"] + T
        return y, new_cache


class DeltaNet(GatedDeltaNet):
    """DeltaNet (the delta rule with no decay, Schlag et al. 2021; Yang et al. 2024),
    registered as ``deltanet``: Gated DeltaNet with ``decay=False`` (no ``W_a``, ``A_log``,
    ``dt_bias``)."""

    @classmethod
    def default_config(cls) -> ml_collections.ConfigDict:
        config = GatedDeltaNet.default_config()
        config.decay = False
        return config
