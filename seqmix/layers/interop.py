"""Linen interop: any seqmix mixer as a ``flax.linen`` module through ``nnx.bridge``.

Example (a mixer inside a Linen model)::

    import flax.linen as nn
    from seqmix.layers import Mamba2, as_linen, mixer_config

    class Encoder(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Dense(64)(x)
            return x + as_linen(Mamba2, mixer_config(Mamba2, d_model=64, headdim=16))(x)

    variables = Encoder().init(jax.random.key(0), x)   # params under "params"
    y = Encoder().apply(variables, x)

With a registered name and a model config, ``seqmix.models.as_linen("mamba2", config)``;
both take the Linen module's name as ``name=``. The wrapped mixer is called as
``module(x, segment_ids=...)``; decoding caches are an NNX feature (use the NNX module for
``generate``).

The parameters keep their logical axes as Linen partitioning metadata (``nn.Partitioned``
boxes): ``init``, ``apply`` and ``jax.grad`` of ``apply`` take the variables as they are;
``nn.unbox(variables["params"])`` gives plain arrays where code reads the leaves themselves
(counting parameters, an optax update of the raw tree, saving).
"""

from __future__ import annotations

import flax.linen as nn
import ml_collections
from flax import nnx
from flax.core import FrozenDict

from seqmix.layers.base import copy_config
from seqmix.layers.bidirectional import make_mixer


def as_linen(
    mixer_cls, config, *, combine: str = "sum", share_params: bool = False, name: str | None = None
) -> nn.Module:
    """A Linen module wrapping ``mixer_cls(config)`` (its bidirectional form when
    ``config.causal`` is False), via ``flax.nnx.bridge.ToLinen``.

    ``config`` is a complete mixer config (``seqmix.layers.mixer_config``); it is frozen, so
    the Linen module stays hashable. Parameters appear under ``params`` with the NNX
    module's attribute paths; their logical axes are kept as Linen partitioning metadata.
    """
    frozen = ml_collections.FrozenConfigDict(copy_config(config))
    return nnx.bridge.ToLinen(
        make_mixer,
        args=(mixer_cls, frozen),
        kwargs=FrozenDict({"combine": combine, "share_params": share_params}),
        name=name,
    )
