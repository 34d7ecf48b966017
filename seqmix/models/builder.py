"""``build_model(config, *, rngs)`` and ``param_count(model)``."""

from __future__ import annotations

import jax
from flax import nnx

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
    if int(config.vocab_size) < 1:
        raise ValueError(f"vocab_size must be >= 1, got {config.vocab_size}")
    if kind == "causal_lm":
        return CausalLM(config, rngs=rngs)
    return SequenceClassifier(config, rngs=rngs)


def param_count(model: nnx.Module) -> int:
    """The number of parameters (elements of every ``nnx.Param``)."""
    return int(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))))
