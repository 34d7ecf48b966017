"""Linen interop by mixer name: ``as_linen("mamba2", config)``."""

from __future__ import annotations

import flax.linen as nn

from seqmix.layers import as_linen as _as_linen
from seqmix.models.config import model_config
from seqmix.models.registry import layer_config, mixer_class


def as_linen(
    name: str, config=None, *, causal: bool = True, module_name: str | None = None
) -> nn.Module:
    """The registered mixer ``name`` as a Linen module (``flax.nnx.bridge.ToLinen``),
    configured from a model ``config`` (default ``model_config()``): ``config.mixers.<name>``
    with ``d_model``, ``dtype``, ... ``causal=False`` gives its bidirectional form.
    Call it as ``module(x, segment_ids=None)`` with ``x [B, T, d_model]``."""
    config = model_config() if config is None else config
    return _as_linen(
        mixer_class(name),
        layer_config(config, name, causal=causal),
        combine=config.bidirectional.combine,
        share_params=bool(config.bidirectional.share_params),
        name=module_name,
    )
