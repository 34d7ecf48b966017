"""``model_config(**overrides)``: a complete model ConfigDict with defaults for every mixer.

Keys (defaults):

- ``kind`` (``"causal_lm"``): ``"causal_lm"`` (next-token logits) or ``"classifier"``
  (bidirectional encoder, mean-pooled, ``num_classes`` logits).
- ``vocab_size`` (256), ``d_model`` (256).
- ``layers`` (``"MMMA"``): a list of mixer names, or a pattern string, one letter per
  layer, read through ``legend`` (whitespace ignored).
- ``legend``: letter -> mixer name: ``A`` attention, ``L`` linear_attention, ``R`` retnet,
  ``G`` gla, ``M`` mamba2, ``S`` mamba (S6), ``B`` based, ``D`` gated_deltanet, ``N``
  deltanet.
- ``mlp``: ``type`` (``"swiglu"``, ``"gelu"`` or None: no MLP), ``expansion`` (4.0; SwiGLU
  uses 2/3 of it so both have the same size), ``multiple_of`` (8), ``hidden_size`` (None:
  from ``expansion``; an int sets the hidden width exactly, as a checkpoint does).
- ``tie_embeddings`` (True): the LM head is the transposed embedding.
- ``dtype`` (``"float32"``): compute dtype (``"bfloat16"``); parameters are float32.
- ``norm_eps`` (1e-5); ``max_length`` (2048): default decoding-cache length.
- ``implementation`` (None): ``implementation=`` for every ``seqmix.kernels`` op (a name,
  or a mapping op name -> name); ``config.mixers.<name>.implementation`` overrides it.
- ``num_classes`` (2), ``pad_id`` (0): classifier only: tokens equal to ``pad_id`` are
  padding (excluded from pooling, kept apart from the sequence by the mixers; contiguous at
  the end or the start of a row); None: no padding.
- ``bidirectional``: ``combine`` (``"sum"`` or ``"concat"``), ``share_params`` (False):
  how the classifier's recurrent mixers combine their forward and reversed passes.
- ``mixers.<name>``: each registered mixer's own keys (``MIXERS[name].default_config()``).

``overrides`` replace top-level keys; dict values merge into dict-valued keys
(``mixers={"attention": {"num_heads": 8}}``); ``mlp=None`` means no MLP.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import ml_collections

from seqmix.models.registry import MIXERS

LEGEND = {
    "A": "attention",
    "L": "linear_attention",
    "R": "retnet",
    "G": "gla",
    "M": "mamba2",
    "S": "mamba",
    "B": "based",
    "D": "gated_deltanet",
    "N": "deltanet",
}

KINDS = ("causal_lm", "classifier")


def _defaults() -> dict[str, Any]:
    return {
        "kind": "causal_lm",
        "vocab_size": 256,
        "d_model": 256,
        "layers": "MMMA",
        "legend": dict(LEGEND),
        "mlp": {"type": "swiglu", "expansion": 4.0, "multiple_of": 8, "hidden_size": None},
        "tie_embeddings": True,
        "dtype": "float32",
        "norm_eps": 1e-5,
        "max_length": 2048,
        "implementation": None,
        "num_classes": 2,
        "pad_id": 0,
        "bidirectional": {"combine": "sum", "share_params": False},
        "mixers": {name: cls.default_config().to_dict() for name, cls in MIXERS.items()},
    }


def _plain(value):
    if isinstance(value, ml_collections.FrozenConfigDict):
        value = value.as_configdict()
    if isinstance(value, ml_collections.ConfigDict):
        return value.to_dict()
    return value


def _update(base: dict, override: Mapping, path: str, allowed=()) -> dict:
    """``base`` updated with ``override``; keys outside ``base`` and ``allowed`` raise."""
    override = _plain(override)
    if not isinstance(override, Mapping):
        raise ValueError(f"{path} must be a mapping, got {override!r}")
    unknown = sorted(set(override) - set(base) - set(allowed))
    if unknown:
        raise ValueError(f"unknown keys {unknown} for {path}; known: {sorted(base)}")
    return {**base, **{k: _plain(v) for k, v in override.items()}}


def model_config(**overrides) -> ml_collections.ConfigDict:
    """A complete model ConfigDict (see the module docstring), with ``overrides`` applied.

    Example: ``model_config(layers=["mamba2", "attention"], d_model=64, vocab_size=100)``.
    """
    values = _defaults()
    if "mlp" in overrides and overrides["mlp"] is None:
        overrides = dict(overrides, mlp={"type": None})
    unknown = sorted(set(overrides) - set(values))
    if unknown:
        raise ValueError(f"unknown model config keys {unknown}; known: {sorted(values)}")
    for key, value in overrides.items():
        value = _plain(value)
        if key == "legend":
            values[key] = {**values[key], **dict(value)}
        elif key in ("mlp", "bidirectional"):
            values[key] = _update(values[key], value, key)
        elif key == "mixers":
            for name, own in _plain(value).items():
                if name not in values["mixers"]:
                    raise ValueError(
                        f"mixers: unknown mixer {name!r}; registered mixers: "
                        f"{', '.join(sorted(MIXERS))}"
                    )
                values["mixers"][name] = _update(
                    values["mixers"][name], own, f"mixers.{name}", allowed=("implementation",)
                )
        else:
            values[key] = value
    if isinstance(values["layers"], tuple):
        values["layers"] = list(values["layers"])
    return ml_collections.ConfigDict(values, type_safe=False)


def layer_names(config) -> tuple[str, ...]:
    """The mixer name of every layer: ``config.layers`` as a list of names, or a pattern
    string read through ``config.legend``. Raises ValueError for an unknown letter or name."""
    layers = config.layers
    if not isinstance(layers, (str, list, tuple)):
        raise ValueError(
            f"layers must be a pattern string (e.g. 'MMMA', read through legend) or a list of "
            f"mixer names, got {layers!r} ({type(layers).__name__})"
        )
    if isinstance(layers, str):
        legend = dict(_plain(config.legend))
        names = []
        for letter in "".join(layers.split()):
            if letter not in legend:
                hint = (
                    f" ({layers!r} is a mixer name: pass layers=[{layers!r}])"
                    if layers in MIXERS
                    else ""
                )
                raise ValueError(
                    f"layers: letter {letter!r} of pattern {layers!r} is not in "
                    f"the legend {legend}{hint}"
                )
            names.append(legend[letter])
    else:
        names = list(layers)
    if not names:
        raise ValueError("layers is empty: give a list of mixer names or a pattern string")
    for name in names:
        if name not in MIXERS:
            raise ValueError(
                f"layers: unknown mixer {name!r}; registered mixers: {', '.join(sorted(MIXERS))}"
            )
    return tuple(names)
