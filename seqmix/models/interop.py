"""Linen interop by mixer name: ``as_linen("mamba2", config, name="mixer")``."""

from __future__ import annotations

import flax.linen as nn

from seqmix.layers import as_linen as _as_linen
from seqmix.models.config import model_config
from seqmix.models.registry import layer_config, mixer_class


def as_linen(mixer: str, config=None, *, causal: bool = True, name: str | None = None) -> nn.Module:
    """The registered mixer ``mixer`` as a Linen module (``flax.nnx.bridge.ToLinen``),
    configured from a model ``config`` (default ``model_config()``): ``config.mixers.<mixer>``
    with ``d_model``, ``dtype``, ... ``causal=False`` gives its bidirectional form. ``name``
    is the Linen module's name, as in ``seqmix.layers.as_linen(cls, config, name=...)``.
    Call it as ``module(x, segment_ids=None)`` with ``x [B, T, d_model]``.

    The parameters carry their logical axes as Linen partitioning metadata (``nn.Partitioned``
    boxes): ``init``, ``apply`` and ``jax.grad`` of ``apply`` take them as they are;
    ``nn.unbox(variables["params"])`` gives plain arrays where a function reads the leaves
    themselves (counting, ``optax`` on the raw tree, saving)."""
    config = model_config() if config is None else config
    return _as_linen(
        mixer_class(mixer),
        layer_config(config, mixer, causal=causal),
        combine=config.bidirectional.combine,
        share_params=bool(config.bidirectional.share_params),
        name=name,
    )
