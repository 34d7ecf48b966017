"""The registry of mixers: name -> class. The one list that the builder, configs, tests and
benchmarks iterate over.

A new mixer is a subclass of ``seqmix.layers.Mixer`` added here (or at run time:
``MIXERS["my_mixer"] = MyMixer``; ``model_config()`` then carries its defaults).
"""

from __future__ import annotations

from flax import nnx

from seqmix.layers import (
    GLA,
    Attention,
    Based,
    DeltaNet,
    GatedDeltaNet,
    LinearAttention,
    Mamba,
    Mamba2,
    RetNet,
    copy_config,
    make_mixer,
)
from seqmix.layers.base import COMMON

MIXERS: dict[str, type] = {
    "attention": Attention,
    "linear_attention": LinearAttention,
    "retnet": RetNet,
    "gla": GLA,
    "mamba2": Mamba2,
    "mamba": Mamba,
    "based": Based,
    "gated_deltanet": GatedDeltaNet,
    "deltanet": DeltaNet,
}

# Keys of config.mixers.<name> that may be set beyond the mixer's defaults.
PER_MIXER_OPTIONAL = ("implementation",)


def mixer_class(name: str) -> type:
    """``MIXERS[name]``, or a ValueError that lists the registered names."""
    try:
        return MIXERS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown mixer {name!r}; registered mixers: {', '.join(sorted(MIXERS))}"
        ) from None


def layer_config(config, name: str, *, causal: bool):
    """The config a layer's mixer receives: ``config.mixers.<name>`` plus the model-level
    ``d_model``, ``dtype``, ``norm_eps``, ``implementation`` (unless the mixer sets its own)
    and ``causal``."""
    cls = mixer_class(name)
    defaults = cls.default_config().to_dict()
    own = copy_config(config.mixers[name]) if name in config.mixers else copy_config(defaults)
    unknown = sorted(set(own.keys()) - set(defaults) - set(PER_MIXER_OPTIONAL))
    if unknown:
        raise ValueError(
            f"config.mixers.{name} has unknown keys {unknown}; the keys of "
            f"{name} are {sorted(defaults)} (and {list(PER_MIXER_OPTIONAL)})"
        )
    merged = copy_config(defaults)
    merged.update(own.to_dict())
    for key in COMMON:
        if key == "implementation" and merged.get("implementation") is not None:
            continue
        merged[key] = causal if key == "causal" else config[key]
    return merged


def build_mixer(name: str, config, *, causal: bool, rngs: nnx.Rngs) -> nnx.Module:
    """The mixer ``name`` of a model ``config``: causal, or its bidirectional form
    (attention with ``causal=False``; a recurrent mixer wrapped in ``Bidirectional`` with
    ``config.bidirectional.combine`` and ``share_params``)."""
    cls = mixer_class(name)
    mixer_cfg = layer_config(config, name, causal=causal)
    try:
        return make_mixer(
            cls,
            mixer_cfg,
            rngs=rngs,
            combine=config.bidirectional.combine,
            share_params=bool(config.bidirectional.share_params),
        )
    except ValueError as e:
        raise ValueError(f"config.mixers.{name}: {e}") from None
