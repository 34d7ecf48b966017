"""Parameters with logical sharding axes, and the dense projection every mixer uses.

Every parameter is an ``nnx.Param`` holding float32 values whose metadata ``out_sharding``
names one logical axis per dimension (see ``seqmix.layers`` for the list). Parameters are
never sharded eagerly (``eager_sharding=False``): a model builds on one CPU without a mesh,
and a trainer maps the logical names to mesh axes afterwards, e.g.::

    with flax.linen.logical_axis_rules([("embed", "fsdp"), ("mlp", None), ...]):
        specs = nnx.get_partition_spec(nnx.state(model))
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Array = jax.Array
Axes = tuple[str | None, ...]

PARAM_DTYPE = jnp.float32


def param(
    rngs: nnx.Rngs | None,
    init: Callable[..., Array] | Array,
    shape: Sequence[int],
    axes: Sequence[str | None],
) -> nnx.Param:
    """A float32 ``nnx.Param`` of ``shape`` tagged with logical ``axes``.

    ``init`` is an initializer ``init(key, shape, dtype)`` (drawn from ``rngs.params()``) or
    an array of the right shape (deterministic initialisations: A_log, dt_bias, ones).
    """
    shape = tuple(int(s) for s in shape)
    axes = tuple(axes)
    if len(axes) != len(shape):
        raise ValueError(f"param: {len(axes)} logical axes {axes} for shape {shape}")
    if callable(init):
        value = init(rngs.params(), shape, PARAM_DTYPE)
    else:
        value = jnp.asarray(init, PARAM_DTYPE)
        if value.shape != shape:
            raise ValueError(f"param: initial value has shape {value.shape}, expected {shape}")
    return nnx.Param(value, out_sharding=axes, eager_sharding=False)


def lecun_normal(scale: float = 1.0) -> Callable[..., Array]:
    """Truncated normal with variance ``scale / fan_in`` (fan_in = first dimension)."""
    return jax.nn.initializers.variance_scaling(
        scale, "fan_in", "truncated_normal", in_axis=0, out_axis=-1
    )


class Dense(nnx.Module):
    """``y = x @ kernel (+ bias)`` over the last axis, computed in ``dtype``.

    kernel: float32 ``[in_features, out_features]`` with logical axes ``axes``; bias:
    ``[out_features]`` with axes ``(axes[1],)``. The output has the compute ``dtype``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        axes: Axes,
        *,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        use_bias: bool = False,
        init: Callable[..., Array] | None = None,
        bias_init: Callable[..., Array] | Array | None = None,
    ):
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.dtype = jnp.dtype(dtype).name
        self.kernel = param(rngs, init or lecun_normal(), (in_features, out_features), axes)
        if use_bias:
            self.bias = param(
                rngs,
                jax.nn.initializers.zeros if bias_init is None else bias_init,
                (out_features,),
                (axes[1],),
            )
        else:
            self.bias = None

    def __call__(self, x: Array) -> Array:
        dtype = jnp.dtype(self.dtype)
        y = jnp.einsum("...i,io->...o", x.astype(dtype), self.kernel[...].astype(dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(dtype)
        return y
