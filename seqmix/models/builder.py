"""``build_model(config, *, rngs)``, a model from given parameters, and ``param_count``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from seqmix import checks
from seqmix.models.causal_lm import CausalLM
from seqmix.models.classifier import SequenceClassifier
from seqmix.models.config import KINDS


def build_model(config, *, rngs: nnx.Rngs) -> CausalLM | SequenceClassifier:
    """A ``CausalLM`` (``config.kind == "causal_lm"``) or a ``SequenceClassifier``
    (``"classifier"``) from a model config (``seqmix.models.model_config``).

    Raises ValueError for an unknown kind, an unknown mixer name or legend letter (listing
    the registered names), unknown mixer keys, and inconsistent sizes (the message names the
    layer, ``config.mixers.<name>`` and the keys).
    """
    kind = config.kind
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    checks.positive_int(config.vocab_size, "vocab_size")
    if kind == "causal_lm":
        return CausalLM(config, rngs=rngs)
    return SequenceClassifier(config, rngs=rngs)


def param_count(model: nnx.Module) -> int:
    """The number of parameters (elements of every ``nnx.Param``)."""
    return int(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))))


def model_from_params(config, params: Mapping[tuple, Any]) -> CausalLM | SequenceClassifier:
    """The model of ``config`` whose parameters are ``params`` (parameter path, as in
    ``nnx.to_flat_state``, -> array; cast to float32), built without drawing random
    weights first. Raises ValueError for a missing, unexpected or misshapen parameter."""
    abstract = nnx.eval_shape(lambda: build_model(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    flat = nnx.to_flat_state(state)
    extra = sorted(set(params) - {path for path, _ in flat}, key=str)
    if extra:
        raise ValueError(
            f"the model of this config has no parameters {['.'.join(map(str, p)) for p in extra[:4]]}"
        )
    leaves = []
    for path, var in flat:
        if path not in params:
            raise ValueError(f"no value for parameter {'.'.join(map(str, path))}")
        want = var.get_value()
        value = np.asarray(params[path])
        if value.shape != tuple(want.shape):
            raise ValueError(
                f"parameter {'.'.join(map(str, path))}: shape {value.shape}, expected {want.shape}"
            )
        leaves.append((path, var.replace(jnp.asarray(value.astype(np.float32), want.dtype))))
    return nnx.merge(graphdef, nnx.from_flat_state(leaves))


def model_params(model) -> dict[tuple, np.ndarray]:
    """Parameter path -> numpy array (float32) of a model."""
    return {
        path: np.asarray(var.get_value())
        for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }
