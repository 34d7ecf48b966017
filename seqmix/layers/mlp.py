"""The feed-forward block: SwiGLU or GELU."""

from __future__ import annotations

import jax
from flax import nnx

from seqmix import checks
from seqmix.layers.params import Dense

Array = jax.Array

MLP_TYPES = ("swiglu", "gelu")


def hidden_size(d_model: int, mlp_type: str, expansion: float, multiple_of: int = 8) -> int:
    """Hidden width: ``expansion * d_model``, times 2/3 for SwiGLU (so that SwiGLU and GELU
    have the same parameter count), rounded up to a multiple of ``multiple_of``."""
    width = expansion * d_model * (2.0 / 3.0 if mlp_type == "swiglu" else 1.0)
    return -(-round(width) // multiple_of) * multiple_of


class MLP(nnx.Module):
    """``swiglu``: ``down(silu(gate(x)) * up(x))``; ``gelu``: ``down(gelu(up(x)))``.

    The hidden width is ``hidden_features`` when given (a checkpoint's exact size), else
    ``hidden_size(d_model, mlp_type, expansion, multiple_of)``.

    Kernels: ``up``/``gate`` ``[d_model, hidden]`` axes ``("embed", "mlp")``; ``down``
    ``[hidden, d_model]`` axes ``("mlp", "embed")``. No biases.
    """

    def __init__(
        self,
        d_model: int,
        *,
        mlp_type: str = "swiglu",
        expansion: float = 4.0,
        multiple_of: int = 8,
        hidden_features: int | None = None,
        dtype="float32",
        rngs: nnx.Rngs,
    ):
        if mlp_type not in MLP_TYPES:
            raise ValueError(f"mlp.type must be one of {MLP_TYPES} or None, got {mlp_type!r}")
        d_model = checks.positive_int(d_model, "d_model")
        expansion = checks.positive_float(expansion, "mlp.expansion")
        multiple_of = checks.positive_int(multiple_of, "mlp.multiple_of")
        self.mlp_type = mlp_type
        if hidden_features is None:
            hidden = hidden_size(d_model, mlp_type, expansion, multiple_of)
        else:
            hidden = checks.positive_int(hidden_features, "mlp.hidden_size")
        self.hidden = hidden
        self.up = Dense(d_model, hidden, ("embed", "mlp"), rngs=rngs, dtype=dtype)
        self.gate = (
            Dense(d_model, hidden, ("embed", "mlp"), rngs=rngs, dtype=dtype)
            if mlp_type == "swiglu"
            else None
        )
        self.down = Dense(hidden, d_model, ("mlp", "embed"), rngs=rngs, dtype=dtype)

    def __call__(self, x: Array) -> Array:
        if self.mlp_type == "swiglu":
            h = jax.nn.silu(self.gate(x)) * self.up(x)
        else:
            h = jax.nn.gelu(self.up(x))
        return self.down(h)
