"""Mamba-2 (SSD) through the chunked linear-attention op."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from seqmix import kernels, parallel
from seqmix.layers.base import Mixer, cache_sizes, divide, size
from seqmix.layers.conv import ShortConv
from seqmix.layers.norms import GatedRMSNorm
from seqmix.layers.params import Dense, param

Array = jax.Array


def inverse_softplus(y: Array) -> Array:
    """``x`` with ``softplus(x) = y`` (y > 0)."""
    return y + jnp.log(-jnp.expm1(-y))


def dt_bias_init(dt_min: float, dt_max: float, floor: float):
    """Initializer of a dt bias: ``softplus(bias)`` log-uniform in ``[dt_min, dt_max]``,
    clamped below at ``floor`` (Mamba's ``dt_init``)."""
    if not 0 < dt_min <= dt_max:
        raise ValueError(f"need 0 < dt_min <= dt_max, got dt_min={dt_min}, dt_max={dt_max}")

    def init(key, shape, dtype):
        u = jax.random.uniform(key, shape, jnp.float32)
        dt = jnp.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        return inverse_softplus(jnp.maximum(dt, floor)).astype(dtype)

    return init


class Mamba2(Mixer):
    """Mamba-2, registered as ``mamba2``.

    ``[z, xBC, dt] = x W_in``; ``xBC = silu(conv(xBC))`` split into ``x [B,T,H,P]``,
    ``B, C [B,T,G,N]``; ``dt = softplus(dt + dt_bias)``, ``A = -exp(A_log)`` per head;
    SSD is ``seqmix.kernels.linear_attention(q=C, k=B, v=x*dt, log_decay=A*dt, scale=1)``
    (head ``h`` reads group ``h // (H / G)``); ``y += D x``; ``out = W_out norm(y * silu(z))``
    with a gated RMS norm over each group's channels.

    ``d_inner = expand * d_model``, ``H = d_inner / headdim``, ``G = ngroups``,
    ``N = d_state``. dt_bias makes the initial dt log-uniform in ``[dt_min, dt_max]``,
    ``A`` starts uniform in ``A_init_range``, ``D`` at ones.

    Options (defaults give Mamba-2): ``conv_activation=None`` drops the silu after the
    conv; ``gated_norm=False`` drops ``z`` and the gated norm (``out = W_out y``);
    ``use_bias`` adds biases to ``W_in`` and ``W_out``. With all three (and ``A dt = 0``,
    ``D = 0``, an identity conv) the layer is linear attention of its x, B, C projections,
    which is how an attention layer converts into it (``seqmix.models.convert``).

    Decoding cache: ``{"state": float32 [B, H, N, P], "conv": [B, d_conv - 1, d_inner +
    2 G N], "lengths": [B] int32}``.
    """

    @classmethod
    def default_config(cls) -> ml_collections.ConfigDict:
        return ml_collections.ConfigDict(
            {
                "d_state": 64,
                "d_conv": 4,
                "expand": 2,
                "headdim": 32,
                "ngroups": 1,
                "dt_min": 1e-3,
                "dt_max": 0.1,
                "dt_init_floor": 1e-4,
                "A_init_range": (1.0, 16.0),
                "conv_bias": True,
                "conv_activation": "silu",  # or None: a linear conv
                "gated_norm": True,  # False: no z projection and no norm (y -> out_proj)
                "use_bias": False,  # biases on in_proj and out_proj
                "chunk_size": 64,
            }
        )

    def __init__(self, config, *, rngs: nnx.Rngs):
        self._common(config)
        d_inner = size(config, "expand") * self.d_model
        P = size(config, "headdim")
        H = divide(d_inner, P, "expand * d_model", "headdim")
        G = size(config, "ngroups")
        divide(H, G, "the number of heads (expand * d_model / headdim)", "ngroups")
        N = size(config, "d_state")
        activation = config.get("conv_activation", "silu")
        if activation not in ("silu", None):
            raise ValueError(f"conv_activation must be 'silu' or None, got {activation!r}")
        self.gated_norm = bool(config.get("gated_norm", True))
        use_bias = bool(config.get("use_bias", False))
        self.d_inner, self.num_heads, self.headdim, self.ngroups, self.d_state = (
            d_inner,
            H,
            P,
            G,
            N,
        )
        self.chunk_size = size(config, "chunk_size")
        self.conv_dim = d_inner + 2 * G * N
        kw = dict(rngs=rngs, dtype=self.dtype, use_bias=use_bias)
        z_dim = d_inner if self.gated_norm else 0
        self.in_proj = Dense(
            self.d_model, z_dim + d_inner + 2 * G * N + H, ("embed", "heads"), **kw
        )
        self.conv = ShortConv(
            self.conv_dim,
            size(config, "d_conv"),
            use_bias=bool(config.conv_bias),
            activation=activation,
            dtype=self.dtype,
            implementation=self.implementation,
            rngs=rngs,
        )
        self.dt_bias = param(
            rngs, dt_bias_init(config.dt_min, config.dt_max, config.dt_init_floor), (H,), ("heads",)
        )
        lo, hi = (float(a) for a in config.A_init_range)
        if not 0 < lo <= hi:
            raise ValueError(f"A_init_range must satisfy 0 < low <= high, got {(lo, hi)}")

        def a_log_init(key, shape, dtype):
            return jnp.log(jax.random.uniform(key, shape, jnp.float32, lo, hi)).astype(dtype)

        self.A_log = param(rngs, a_log_init, (H,), ("heads",))
        self.D = param(None, jnp.ones((H,)), (H,), ("heads",))
        self.norm = (
            GatedRMSNorm(d_inner, groups=G, eps=self.norm_eps, dtype=self.dtype, rngs=rngs)
            if self.gated_norm
            else None
        )
        self.out_proj = Dense(d_inner, self.d_model, ("heads", "embed"), **kw)

    def init_cache(self, batch_size: int, max_length: int) -> dict[str, Array]:
        batch_size, _ = cache_sizes(batch_size, max_length)  # a recurrent state: fixed size
        return {
            "state": jnp.zeros(
                (batch_size, self.num_heads, self.d_state, self.headdim), jnp.float32
            ),
            "conv": self.conv.init_state(batch_size),
            "lengths": jnp.zeros((batch_size,), jnp.int32),
        }

    def __call__(self, x: Array, *, segment_ids: Array | None = None, cache=None):
        self._check_call(x, segment_ids, cache)
        Bsz, T, _ = x.shape
        H, P, G, N = self.num_heads, self.headdim, self.ngroups, self.d_state
        proj = self.in_proj(x)
        if self.gated_norm:
            z, proj = proj[..., : self.d_inner], proj[..., self.d_inner :]
        xbc, dt = proj[..., : self.conv_dim], proj[..., self.conv_dim :]
        new_cache = {}
        if cache is None:
            xbc = self.conv(xbc, segment_ids=segment_ids)
        elif T == 1:
            y, new_cache["conv"] = self.conv.step(xbc[:, 0], cache["conv"])
            xbc = y[:, None]
        else:
            xbc, new_cache["conv"] = self.conv(xbc, state=cache["conv"])
        xs, b, c = jnp.split(xbc, [self.d_inner, self.d_inner + G * N], axis=-1)
        xs = xs.reshape(Bsz, T, H, P)
        b, c = b.reshape(Bsz, T, G, N), c.reshape(Bsz, T, G, N)
        dt = jax.nn.softplus(dt.astype(jnp.float32) + self.dt_bias[...])  # [B, T, H]
        A = -jnp.exp(self.A_log[...])
        v = (xs.astype(jnp.float32) * dt[..., None]).astype(self.dtype)
        g = A * dt
        if cache is None:
            y = parallel.linear_attention(
                c,
                b,
                v,
                g,
                scale=1.0,
                segment_ids=segment_ids,
                chunk_size=self.chunk_size,
                implementation=self.impl("linear_attention"),
            )
        elif T == 1:
            y, new_cache["state"] = kernels.linear_attention_step(
                c[:, 0],
                b[:, 0],
                v[:, 0],
                cache["state"],
                g[:, 0],
                scale=1.0,
                implementation=self.impl("linear_attention_step"),
            )
            y = y[:, None]
        else:
            y, new_cache["state"] = kernels.linear_attention(
                c,
                b,
                v,
                g,
                scale=1.0,
                initial_state=cache["state"],
                return_final_state=True,
                chunk_size=self.chunk_size,
                implementation=self.impl("linear_attention"),
            )
        y = y.astype(jnp.float32) + self.D[...][:, None] * xs.astype(jnp.float32)
        y = y.reshape(Bsz, T, self.d_inner)
        out = self.out_proj(self.norm(y, z) if self.gated_norm else y.astype(self.dtype))
        if cache is None:
            return out
        new_cache["lengths"] = cache["lengths"] + T
        return out, new_cache
