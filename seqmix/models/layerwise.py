"""A causal LM run layer by layer: what chosen mixers receive and return, a forward pass
with some mixers swapped, agreement with a teacher (KL of the logits), and the importance
of each attention layer measured by that agreement.

These are the pieces a distillation objective is built from::

    h = mixer_inputs(teacher, tokens, layers=student.replaced)   # teacher's hidden states
    target = mixer_outputs(teacher, h)                             # teacher attention
    pred = mixer_outputs(student.model, h)                         # student mixers, same h
    kl = logit_kl(teacher(tokens), student.model(tokens), temperature=2.0)
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from seqmix.models.causal_lm import CausalLM
from seqmix.models.config import layer_names
from seqmix.models.convert import DEFAULT_HALF_LIVES, check_teacher, conversion, convert_layer

Array = jax.Array


def check_pair(teacher: CausalLM, student: CausalLM) -> None:
    """Raises ValueError unless teacher and student have the same vocabulary, width and
    number of layers (logits and hidden states are compared position by position)."""
    if teacher.vocab_size != student.vocab_size:
        raise ValueError(
            f"teacher and student vocabularies differ: teacher vocab_size "
            f"{teacher.vocab_size}, student vocab_size {student.vocab_size}"
        )
    if teacher.backbone.d_model != student.backbone.d_model:
        raise ValueError(
            f"teacher and student widths differ: teacher d_model {teacher.backbone.d_model}, "
            f"student d_model {student.backbone.d_model}"
        )
    if len(teacher.layer_names) != len(student.layer_names):
        raise ValueError(
            f"teacher has {len(teacher.layer_names)} layers, student "
            f"{len(student.layer_names)}; layer i of one aligns with layer i of the other"
        )


def _layer_set(model: CausalLM, layers: Iterable[int] | None) -> list[int]:
    n = len(model.backbone.layers)
    out = list(range(n)) if layers is None else sorted({int(i) for i in layers})
    bad = [i for i in out if not 0 <= i < n]
    if bad:
        raise ValueError(f"layers must be indices in [0, {n}), got {bad}")
    return out


def mixer_inputs(
    model: CausalLM,
    tokens: Array,
    *,
    layers: Iterable[int] | None = None,
    segment_ids: Array | None = None,
) -> dict[int, Array]:
    """Layer index -> what that layer's mixer receives in ``model(tokens)``: the block's
    RMSNorm of the residual stream, ``[B, T, d_model]`` in the compute dtype. ``layers``
    (default: every layer) may be a mapping (its keys are used)."""
    wanted = _layer_set(model, layers)
    if not wanted:
        return {}
    backbone = model.backbone
    x = backbone.embed(tokens)
    out = {}
    for i, block in enumerate(backbone.layers):
        x = x.astype(jnp.float32)
        if i in wanted:
            out[i] = block.norm(x)
        if i == wanted[-1]:
            break
        x = block(x, segment_ids=segment_ids)
    return out


def mixer_outputs(
    model: CausalLM, inputs: Mapping[int, Array], *, segment_ids: Array | None = None
) -> dict[int, Array]:
    """Layer index -> ``model``'s mixer ``i`` applied to ``inputs[i]`` (e.g. the teacher's
    hidden states from ``mixer_inputs``), ``[B, T, d_model]``."""
    _layer_set(model, inputs)
    return {
        i: model.backbone.layers[i].mixer(h, segment_ids=segment_ids) for i, h in inputs.items()
    }


def forward_with(
    model: CausalLM,
    tokens: Array,
    mixers: Mapping[int, nnx.Module],
    *,
    segment_ids: Array | None = None,
) -> Array:
    """float32 logits ``[B, T, vocab]`` of ``model`` with mixer ``i`` replaced by
    ``mixers[i]`` (every other parameter the model's own); with no replacements this is
    ``model(tokens)``."""
    _layer_set(model, mixers)
    backbone = model.backbone
    x = backbone.embed(tokens)
    for i, block in enumerate(backbone.layers):
        if i not in mixers:
            x = block(x, segment_ids=segment_ids)
            continue
        # Block.__call__ with another mixer: x + mixer(norm(x)), then x + mlp(norm(x)).
        x = x.astype(jnp.float32)
        x = x + mixers[i](block.norm(x), segment_ids=segment_ids).astype(jnp.float32)
        if block.mlp is not None:
            x = x + block.mlp(block.mlp_norm(x)).astype(jnp.float32)
    h = backbone.final_norm(x)
    return backbone.embed.attend(h) if model.head is None else model.head(h)


def logit_kl(
    teacher_logits: Array,
    student_logits: Array,
    *,
    temperature: float = 1.0,
    mask: Array | None = None,
) -> Array:
    """Mean over positions of ``KL(p || q)`` with ``p = softmax(teacher / temperature)``,
    ``q = softmax(student / temperature)`` (float32 scalar, nats; not scaled by
    ``temperature^2``). ``mask [B, T]`` (bool or weights) averages over chosen positions.
    """
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"teacher logits {teacher_logits.shape} and student logits "
            f"{student_logits.shape} differ in shape (vocabularies must match)"
        )
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    t = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
    s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    kl = jnp.sum(jnp.exp(t) * (t - s), axis=-1)
    if mask is None:
        return jnp.mean(kl)
    w = jnp.asarray(mask, jnp.float32)
    return jnp.sum(kl * w) / jnp.maximum(jnp.sum(w), 1.0)


@functools.partial(nnx.jit, static_argnames=("index", "temperature"))
def _replaced_kl(model, mixer, tokens, segment_ids, reference, *, temperature, index):
    logits = forward_with(model, tokens, {index: mixer}, segment_ids=segment_ids)
    return logit_kl(reference, logits, temperature=temperature)


def layer_importance(
    teacher: CausalLM,
    config,
    tokens: Array,
    mixer: str,
    *,
    candidates: Iterable[int] | None = None,
    overrides: Mapping | None = None,
    temperature: float = 1.0,
    segment_ids: Array | None = None,
    decay_half_lives=DEFAULT_HALF_LIVES,
    rngs: nnx.Rngs | None = None,
) -> dict[int, float]:
    """Layer index -> the loss in teacher agreement when that layer alone is replaced by
    ``mixer`` converted from its weights (no training): ``logit_kl(teacher(tokens),
    student_i(tokens), temperature)``. A low score marks a layer that can be replaced
    first (``seqmix.models.convert.least_important``).

    Args:
      teacher: the teacher ``CausalLM``; ``config`` its model config.
      tokens: int ``[B, T]``, a batch of text the teacher models.
      mixer: the target mixer name (a key of ``seqmix.models.convert.CONVERSIONS``).
      candidates: the layers to score (default: every attention layer).
      overrides: keys of ``config.mixers.<mixer>`` for the converted layer.
    """
    check_teacher(teacher, config)
    conversion(mixer)
    names = layer_names(config)
    if candidates is None:
        candidates = [i for i, n in enumerate(names) if n == "attention"]
    candidates = _layer_set(teacher, candidates)
    for i in candidates:
        if names[i] != "attention":
            raise ValueError(f"candidate layer {i} is {names[i]!r}, not attention")
    reference = nnx.jit(lambda m, t, s: m(t, segment_ids=s))(teacher, tokens, segment_ids)
    scores = {}
    for i in candidates:
        new = convert_layer(
            teacher.backbone.layers[i].mixer,
            mixer,
            config,
            overrides=overrides,
            decay_half_lives=decay_half_lives,
            rngs=rngs,
        )
        kl = _replaced_kl(
            teacher, new, tokens, segment_ids, reference, temperature=float(temperature), index=i
        )
        scores[i] = float(kl)
    return scores
