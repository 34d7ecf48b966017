"""The registry of mixers: name -> class, and the ``seqmix.kernels`` ops each one calls.
The one list that the builder, configs, tests and benchmarks iterate over.

A new mixer is a subclass of ``seqmix.layers.Mixer`` added here (or at run time:
``MIXERS["my_mixer"] = MyMixer``; ``model_config()`` then carries its defaults), with its ops
in ``OPS``.

    python -m seqmix.models.registry

lists every mixer, the ops it calls and the implementations of each op available on this
machine.
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

# The seqmix.kernels ops each mixer calls: its sequence pass and its decoding step. The
# short causal convolution of linear_attention, retnet, gla and based runs only with their
# ``short_conv`` option; mamba and mamba2 always have it.
_LINEAR = ("linear_attention", "linear_attention_step")
_CONV = ("causal_conv1d", "causal_conv1d_step")
OPS: dict[str, tuple[str, ...]] = {
    "attention": ("attention", "decode_attention"),
    "linear_attention": _LINEAR + _CONV,
    "retnet": _LINEAR + _CONV,
    "gla": _LINEAR + _CONV,
    "mamba2": _LINEAR + _CONV,
    "mamba": ("selective_scan", *_CONV),
    "based": _LINEAR + ("attention", "decode_attention") + _CONV,
    "gated_deltanet": ("gated_delta_rule", "gated_delta_rule_step", *_CONV),
    "deltanet": ("gated_delta_rule", "gated_delta_rule_step", *_CONV),
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
    # plain dicts merged: ConfigDict.update would convert a value to the default's type
    # (True -> 1.0 for a float key), hiding it from the mixer's checks
    merged = copy_config({**defaults, **own.to_dict()})
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


def mixer_ops(name: str) -> tuple[str, ...]:
    """The ``seqmix.kernels`` ops that mixer ``name`` calls (``OPS``)."""
    mixer_class(name)
    try:
        return OPS[name]
    except KeyError:
        raise ValueError(f"mixer {name!r} has no entry in registry.OPS") from None


def implementations_here(op: str) -> tuple[list[str], list[str]]:
    """``(native, interpreted)``: the implementations of ``seqmix.kernels`` op ``op`` that run
    natively on this machine, and the Pallas ones that run here in interpret mode only."""
    from seqmix.kernels import dispatch  # importing seqmix.kernels registers every op

    ops = dispatch.registered_ops()
    if op not in ops:
        raise ValueError(f"unknown op {op!r}; the ops are {sorted(ops)}")
    names = list(ops[op].impls)
    with dispatch.interpret(False):
        native = [n for n in names if dispatch.available(n)]
    interpreted = [n for n in names if n in dispatch.PALLAS_PLATFORMS and n not in native]
    return native, interpreted


def describe() -> str:
    """A table: mixer -> op -> implementations available on this machine."""
    from seqmix.kernels import dispatch

    lines = [
        f"platform: {dispatch.platform()}",
        "| mixer | op | implementations here | in interpret mode |",
        "| --- | --- | --- | --- |",
    ]
    for name in MIXERS:
        for op in mixer_ops(name):
            native, interpreted = implementations_here(op)
            lines.append(f"| {name} | {op} | {', '.join(native)} | {', '.join(interpreted)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(describe())
