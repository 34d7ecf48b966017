"""The pre-norm residual block: ``x + mixer(norm(x))``, then ``x + mlp(norm(x))``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from seqmix.layers.mlp import MLP
from seqmix.layers.norms import RMSNorm

Array = jax.Array


class Block(nnx.Module):
    """``h = x + mixer(RMSNorm(x))``; ``y = h + MLP(RMSNorm(h))`` (no MLP when
    ``mlp_type`` is None).

    The residual stream stays float32 (as Mamba's ``residual_in_fp32``); the norms hand the
    mixer and the MLP the compute dtype.
    """

    def __init__(
        self,
        mixer: nnx.Module,
        d_model: int,
        *,
        mlp_type: str | None = "swiglu",
        expansion: float = 4.0,
        multiple_of: int = 8,
        hidden_features: int | None = None,
        norm_eps: float = 1e-5,
        dtype="float32",
        rngs: nnx.Rngs,
    ):
        self.norm = RMSNorm(d_model, eps=norm_eps, dtype=dtype, rngs=rngs)
        self.mixer = mixer
        if mlp_type is None:
            self.mlp_norm = self.mlp = None
        else:
            self.mlp_norm = RMSNorm(d_model, eps=norm_eps, dtype=dtype, rngs=rngs)
            self.mlp = MLP(
                d_model,
                mlp_type=mlp_type,
                expansion=expansion,
                multiple_of=multiple_of,
                hidden_features=hidden_features,
                dtype=dtype,
                rngs=rngs,
            )

    def __call__(self, x: Array, *, segment_ids: Array | None = None, cache=None):
        x = x.astype(jnp.float32)
        out = self.mixer(self.norm(x), segment_ids=segment_ids, cache=cache)
        y, new_cache = out if cache is not None else (out, None)
        x = x + y.astype(jnp.float32)
        if self.mlp is not None:
            x = x + self.mlp(self.mlp_norm(x)).astype(jnp.float32)
        return x if cache is None else (x, new_cache)

    def init_cache(self, batch_size: int, max_length: int):
        return self.mixer.init_cache(batch_size, max_length)
