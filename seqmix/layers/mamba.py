"""Mamba-1 through the selective scan op."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from seqmix import checks, kernels, parallel
from seqmix.layers import segments
from seqmix.layers.base import Mixer, cache_sizes, optional_size, size
from seqmix.layers.conv import ShortConv
from seqmix.layers.mamba2 import dt_bias_init
from seqmix.layers.params import Dense, param

Array = jax.Array

# At a segment start the scan's decay exp(dt A) must vanish: dt is raised there so that
# dt * max(A) <= -RESET_LOG_DECAY (exp underflows to exactly 0 in float32), and u is scaled
# by dt_true / dt_reset so that the input term dt B u is unchanged.
RESET_LOG_DECAY = 120.0


class Mamba(Mixer):
    """Mamba-1 (selective SSM), registered as ``mamba``.

    ``[x, z] = x W_in``; ``x = silu(conv(x))``; ``[dt, B, C] = x W_x`` (``dt_rank``, ``N``,
    ``N``); ``delta = dt W_dt``; ``seqmix.kernels.selective_scan(x, delta, A=-exp(A_log), B,
    C, D, z, delta_bias=dt_bias, delta_softplus=True)``; ``out = y W_out``.

    ``A_log[d, n] = log(n + 1)`` (S4D-real), ``D = 1``, ``softplus(dt_bias)`` log-uniform in
    ``[dt_min, dt_max]``, ``W_dt`` uniform in ``+-dt_scale / sqrt(dt_rank)``.

    Packed rows (``segment_ids``): the scan state is reset at segment starts by a large
    ``dt`` there (see ``RESET_LOG_DECAY``); D and the z gate are then applied here.

    Decoding cache: ``{"state": float32 [B, d_inner, N], "conv": [B, d_conv - 1, d_inner],
    "lengths": [B] int32}``; one token is a scan of length 1 from the cached state.
    """

    @classmethod
    def default_config(cls) -> ml_collections.ConfigDict:
        return ml_collections.ConfigDict(
            {
                "d_state": 16,
                "d_conv": 4,
                "expand": 2,
                "dt_rank": None,  # None: ceil(d_model / 16)
                "dt_min": 1e-3,
                "dt_max": 0.1,
                "dt_init_floor": 1e-4,
                "dt_scale": 1.0,
                "conv_bias": True,
            }
        )

    def __init__(self, config, *, rngs: nnx.Rngs):
        self._common(config)
        d_inner = size(config, "expand") * self.d_model
        N = size(config, "d_state")
        R = optional_size(config, "dt_rank")
        if R is None:
            R = math.ceil(self.d_model / 16)
        self.d_inner, self.d_state, self.dt_rank = d_inner, N, R
        kw = dict(rngs=rngs, dtype=self.dtype)
        self.in_proj = Dense(self.d_model, 2 * d_inner, ("embed", "heads"), **kw)
        self.conv = ShortConv(
            d_inner,
            size(config, "d_conv"),
            use_bias=bool(config.conv_bias),
            dtype=self.dtype,
            implementation=self.implementation,
            rngs=rngs,
        )
        self.x_proj = Dense(d_inner, R + 2 * N, ("heads", None), **kw)
        bound = checks.positive_float(config.dt_scale, "dt_scale") * R**-0.5
        uniform = jax.nn.initializers.uniform(2 * bound)
        self.dt_proj = Dense(
            R, d_inner, (None, "heads"), **kw, init=lambda k, s, d: uniform(k, s, d) - bound
        )
        self.dt_bias = param(
            rngs,
            dt_bias_init(config.dt_min, config.dt_max, config.dt_init_floor),
            (d_inner,),
            ("heads",),
        )
        a = jnp.broadcast_to(jnp.log(jnp.arange(1, N + 1, dtype=jnp.float32)), (d_inner, N))
        self.A_log = param(None, a, (d_inner, N), ("heads", "state"))
        self.D = param(None, jnp.ones((d_inner,)), (d_inner,), ("heads",))
        self.out_proj = Dense(d_inner, self.d_model, ("heads", "embed"), **kw)

    def init_cache(self, batch_size: int, max_length: int) -> dict[str, Array]:
        batch_size, _ = cache_sizes(batch_size, max_length)  # a recurrent state: fixed size
        return {
            "state": jnp.zeros((batch_size, self.d_inner, self.d_state), jnp.float32),
            "conv": self.conv.init_state(batch_size),
            "lengths": jnp.zeros((batch_size,), jnp.int32),
        }

    def __call__(self, x: Array, *, segment_ids: Array | None = None, cache=None):
        self._check_call(x, segment_ids, cache)
        T = x.shape[1]
        xs, z = jnp.split(self.in_proj(x), 2, axis=-1)
        new_cache = {}
        if cache is None:
            xs = self.conv(xs, segment_ids=segment_ids)
        elif T == 1:
            y, new_cache["conv"] = self.conv.step(xs[:, 0], cache["conv"])
            xs = y[:, None]
        else:
            xs, new_cache["conv"] = self.conv(xs, state=cache["conv"])
        dt, b, c = jnp.split(self.x_proj(xs), [self.dt_rank, self.dt_rank + self.d_state], axis=-1)
        delta = self.dt_proj(dt)
        A = -jnp.exp(self.A_log[...])
        impl = self.impl("selective_scan")
        if segment_ids is not None:
            y = self._scan_segments(xs, delta, A, b, c, z, segment_ids, impl)
        elif cache is None:
            y = parallel.selective_scan(
                xs,
                delta,
                A,
                b,
                c,
                self.D[...],
                z,
                delta_bias=self.dt_bias[...],
                delta_softplus=True,
                implementation=impl,
            )
        else:
            y, new_cache["state"] = kernels.selective_scan(
                xs,
                delta,
                A,
                b,
                c,
                self.D[...],
                z,
                delta_bias=self.dt_bias[...],
                delta_softplus=True,
                initial_state=cache["state"],
                return_final_state=True,
                implementation=impl,
            )
        out = self.out_proj(y)
        if cache is None:
            return out
        new_cache["lengths"] = cache["lengths"] + T
        return out, new_cache

    def _scan_segments(self, xs, delta, A, b, c, z, segment_ids, impl):
        dt = jax.nn.softplus(delta.astype(jnp.float32) + self.dt_bias[...])  # [B, T, d_inner]
        dt_reset = jax.lax.stop_gradient(RESET_LOG_DECAY / jnp.min(-A, axis=-1))  # [d_inner]
        start = segments.segment_starts(segment_ids)[..., None]
        xf = xs.astype(jnp.float32)
        u = jnp.where(start, xf * (dt / dt_reset), xf).astype(xs.dtype)
        y = parallel.selective_scan(u, jnp.where(start, dt_reset, dt), A, b, c, implementation=impl)
        y = y.astype(jnp.float32) + self.D[...] * xf
        return (y * jax.nn.silu(z.astype(jnp.float32))).astype(self.dtype)
