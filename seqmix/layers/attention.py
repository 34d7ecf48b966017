"""Softmax attention: MHA, GQA and MQA with RoPE, sliding window, softcap, QK-norm, KV cache."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from seqmix import checks, kernels, parallel
from seqmix.kernels.attention.api import normalize_window
from seqmix.layers import segments
from seqmix.layers.base import Mixer, cache_sizes, divide, optional_size, size
from seqmix.layers.norms import RMSNorm
from seqmix.layers.params import Dense
from seqmix.layers.rotary import apply_rotary, rope_scaling_spec

Array = jax.Array


def cached_attention(q, k_old, v_old, k_new, v_new, lengths, *, scale, window_left, softcap):
    """Causal attention of ``T`` new queries over a KV cache plus the ``T`` new keys.

    The cache is a ring of ``S`` slots: slot ``j`` of row ``b`` holds the latest position
    ``p < lengths[b]`` with ``p = j (mod S)`` (a plain cache when ``S`` >= every length).
    New token ``t`` has position ``lengths[b] + t``; query ``P`` sees positions
    ``[P - window_left, P]`` (``[0, P]`` without a window). Dense, float32 softmax.

    Shapes: q ``[B, T, H, D]``; k_old/v_old ``[B, S, Hkv, D]``; k_new/v_new
    ``[B, T, Hkv, D]``; lengths ``[B]``. Returns ``[B, T, H, D]`` in q's dtype.
    """
    B, T, H, D = q.shape
    S, Hkv = k_old.shape[1], k_old.shape[2]
    G = H // Hkv
    keys = jnp.concatenate([k_old, k_new], axis=1).astype(jnp.float32)
    vals = jnp.concatenate([v_old, v_new], axis=1).astype(jnp.float32)
    L = lengths.astype(jnp.int32)[:, None]
    old_pos = L - 1 - jnp.mod(L - 1 - jnp.arange(S, dtype=jnp.int32)[None], S)
    new_pos = L + jnp.arange(T, dtype=jnp.int32)[None]
    kpos = jnp.concatenate([old_pos, new_pos], axis=1)  # [B, S + T]
    diff = new_pos[:, :, None] - kpos[:, None, :]  # [B, T, S + T]
    mask = (kpos >= 0)[:, None, :] & (diff >= 0)
    if window_left is not None:
        mask &= diff <= window_left
    qf = q.astype(jnp.float32).reshape(B, T, Hkv, G, D)
    s = jnp.einsum("btkgd,bskd->bkgts", qf, keys) * scale
    if softcap is not None:
        s = softcap * jnp.tanh(s / softcap)
    s = jnp.where(mask[:, None, None], s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)  # every query sees at least itself
    o = jnp.einsum("bkgts,bskd->btkgd", p, vals)
    return o.reshape(B, T, H, D).astype(q.dtype)


def write_cache(cache_x: Array, new: Array, lengths: Array) -> Array:
    """Writes ``new [B, T, ...]`` at ring slots ``(lengths[b] + t) mod S``; only the last
    ``min(T, S)`` tokens are written (earlier ones would be overwritten anyway)."""
    B, T = new.shape[:2]
    S = cache_x.shape[1]
    m = min(T, S)
    new = new[:, T - m :]
    slots = jnp.mod(lengths.astype(jnp.int32)[:, None] + jnp.arange(T - m, T)[None], S)
    rows = jnp.broadcast_to(jnp.arange(B)[:, None], slots.shape)
    return cache_x.at[rows, slots].set(new.astype(cache_x.dtype))


class Attention(Mixer):
    """Multi-head softmax attention (MHA, GQA, MQA), registered as ``attention``.

    ``q = x Wq``, ``k = x Wk``, ``v = x Wv`` (``num_heads``, ``num_kv_heads`` heads of
    ``head_dim``, which may differ from ``d_model / num_heads``; biases with ``use_bias``
    or, on q/k/v only, ``qkv_bias``), optional RMS QK-norm per head (eps ``norm_eps``),
    RoPE on q and k (``rope_theta``; ``rope_scaling`` for Llama 3's frequencies), then
    ``seqmix.kernels.attention`` (causal or not, ``local_window_size``, ``softcap``,
    ``segment_ids``) and ``o Wo``.

    Decoding cache: ``{"k", "v": [B, S, num_kv_heads, head_dim] (compute dtype), "lengths":
    [B] int32}`` (tokens seen per row), ``S = max_length``, or ``local_window_size + 1`` for
    a sliding window (a ring buffer: constant memory). One new token goes through
    ``seqmix.kernels.decode_attention``; several through a dense masked attention.
    """

    recurrent = False

    @classmethod
    def default_config(cls) -> ml_collections.ConfigDict:
        return ml_collections.ConfigDict(
            {
                "num_heads": 4,
                "num_kv_heads": None,  # None: num_heads (MHA); 1: MQA
                "head_dim": None,  # None: d_model // num_heads
                "rope": True,
                "rope_theta": 10000.0,
                "local_window_size": None,  # int w: query t sees [t - w, t] (and t + w if not causal)
                "softcap": None,
                "qk_norm": False,
                "use_bias": False,  # biases on q, k, v and o
                "qkv_bias": False,  # biases on q, k and v only (Qwen2)
                "rope_scaling": None,  # None or {"rope_type": "llama3", ...} (rotary.py)
            }
        )

    def __init__(self, config, *, rngs: nnx.Rngs, project_output: bool = True):
        self._common(config)
        H = size(config, "num_heads")
        Hkv = size(config, "num_kv_heads", default=H)
        if H % Hkv:
            raise ValueError(f"num_heads ({H}) must be divisible by num_kv_heads ({Hkv})")
        D = optional_size(config, "head_dim")
        if D is None:
            D = divide(self.d_model, H, "d_model", "num_heads")
        if config.rope and D % 2:
            raise ValueError(f"head_dim ({D}) must be even for rope")
        w = config.local_window_size
        if w is not None:
            left, right = normalize_window(w, causal=False)
            w = (left, right) if isinstance(w, (tuple, list)) else left
        self.num_heads, self.num_kv_heads, self.head_dim = H, Hkv, D
        self.rope = bool(config.rope)
        self.rope_theta = checks.positive_float(config.rope_theta, "rope_theta")
        self.rope_scaling = rope_scaling_spec(config.get("rope_scaling"))
        self.local_window_size = w
        self.softcap = (
            None
            if config.softcap is None
            else checks.as_float(config.softcap, "softcap", minimum=0.0, strict=True)
        )
        self.scale = D**-0.5
        kw = dict(rngs=rngs, dtype=self.dtype)
        o_bias = bool(config.use_bias)
        qkv_bias = o_bias or bool(config.get("qkv_bias", False))
        self.q_proj = Dense(self.d_model, H * D, ("embed", "heads"), use_bias=qkv_bias, **kw)
        self.k_proj = Dense(self.d_model, Hkv * D, ("embed", "kv"), use_bias=qkv_bias, **kw)
        self.v_proj = Dense(self.d_model, Hkv * D, ("embed", "kv"), use_bias=qkv_bias, **kw)
        self.o_proj = (
            Dense(H * D, self.d_model, ("heads", "embed"), use_bias=o_bias, **kw)
            if project_output
            else None
        )
        if config.qk_norm:
            self.q_norm = RMSNorm(D, eps=self.norm_eps, dtype=self.dtype, axis=None, rngs=rngs)
            self.k_norm = RMSNorm(D, eps=self.norm_eps, dtype=self.dtype, axis=None, rngs=rngs)
        else:
            self.q_norm = self.k_norm = None

    @property
    def output_features(self) -> int:
        """Width of the output before ``o_proj`` (``num_heads * head_dim``)."""
        return self.num_heads * self.head_dim

    def _window_left(self) -> int | None:
        w = self.local_window_size
        return w[0] if isinstance(w, tuple) else w

    def init_cache(self, batch_size: int, max_length: int) -> dict[str, Array]:
        batch_size, max_length = cache_sizes(batch_size, max_length)
        left = self._window_left()
        S = max_length if left is None else min(max_length, left + 1)
        shape = (batch_size, S, self.num_kv_heads, self.head_dim)
        return {
            "k": jnp.zeros(shape, self.dtype),
            "v": jnp.zeros(shape, self.dtype),
            "lengths": jnp.zeros((batch_size,), jnp.int32),
        }

    def __call__(self, x: Array, *, segment_ids: Array | None = None, cache=None):
        self._check_call(x, segment_ids, cache)
        B, T, _ = x.shape
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        q = self.q_proj(x).reshape(B, T, H, D)
        k = self.k_proj(x).reshape(B, T, Hkv, D)
        v = self.v_proj(x).reshape(B, T, Hkv, D)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rope:
            offset = None if cache is None else cache["lengths"]
            pos = segments.positions(B, T, segment_ids, offset)
            q = apply_rotary(q, pos, theta=self.rope_theta, scaling=self.rope_scaling)
            k = apply_rotary(k, pos, theta=self.rope_theta, scaling=self.rope_scaling)
        if cache is None:
            o = parallel.attention(
                q,
                k,
                v,
                causal=self.causal,
                local_window_size=self.local_window_size,
                segment_ids=segment_ids,
                softcap=self.softcap,
                scale=self.scale,
                implementation=self.impl("attention"),
            )
            return self._project(o)
        lengths = cache["lengths"]
        if T == 1:
            k_cache = write_cache(cache["k"], k, lengths)
            v_cache = write_cache(cache["v"], v, lengths)
            S = k_cache.shape[1]
            o = kernels.decode_attention(
                q[:, 0],
                k_cache,
                v_cache,
                jnp.minimum(lengths + 1, S),
                scale=self.scale,
                softcap=self.softcap,
                implementation=self.impl("decode_attention"),
            )[:, None]
        else:
            o = cached_attention(
                q,
                cache["k"],
                cache["v"],
                k,
                v,
                lengths,
                scale=self.scale,
                window_left=self._window_left(),
                softcap=self.softcap,
            )
            k_cache = write_cache(cache["k"], k, lengths)
            v_cache = write_cache(cache["v"], v, lengths)
        new_cache = {"k": k_cache, "v": v_cache, "lengths": lengths + T}
        return self._project(o), new_cache

    def _project(self, o: Array) -> Array:
        B, T = o.shape[:2]
        o = o.reshape(B, T, self.num_heads * self.head_dim)
        return o if self.o_proj is None else self.o_proj(o)
