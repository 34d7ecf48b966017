"""The teacher of a distillation and the student converted from it: loading a seqmix run or
a Hugging Face checkpoint directory, the student's model config and step-0 parameters, and
the checks that the two align layer by layer (see ``seqmix.train.distill``)."""

from __future__ import annotations

import json
import os
from typing import Any, NamedTuple

import jax
import ml_collections
from flax import nnx

from seqmix.train import steps as steps_lib
from seqmix.train.distill_config import FORMATS, Settings, settings_of


class Teacher(NamedTuple):
    """The frozen teacher: a ``CausalLM`` in eval mode and its seqmix model config."""

    model: Any
    config: Any
    path: str
    format: str


def teacher_format(path: str) -> str:
    """``"hf"`` for a directory with safetensors weights, ``"seqmix"`` for a run directory
    (``config.json`` and ``checkpoints/``); ValueError otherwise."""
    from seqmix.models.pretrained import INDEX, SINGLE

    if os.path.isfile(os.path.join(path, SINGLE)) or os.path.isfile(os.path.join(path, INDEX)):
        return "hf"
    if os.path.isdir(os.path.join(path, "checkpoints")):
        return "seqmix"
    raise ValueError(
        f"distill.teacher {path!r} is neither a seqmix run directory (config.json and "
        f"checkpoints/) nor a Hugging Face checkpoint directory ({SINGLE} or {INDEX})"
    )


def load_teacher(path: str, *, format: str = "auto") -> Teacher:
    """The teacher of a seqmix run directory (``restore_model``: its newest checkpoint) or
    of a local Hugging Face checkpoint directory (``load_pretrained``)."""
    if not path:
        raise ValueError(
            "distill.teacher is empty: give a seqmix run directory of a trained causal LM or "
            "a local Hugging Face checkpoint directory"
        )
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isdir(path):
        raise ValueError(f"distill.teacher {path!r} is not a directory")
    if format not in FORMATS:
        raise ValueError(f"distill.teacher_format must be one of {FORMATS}, got {format!r}")
    fmt = teacher_format(path) if format == "auto" else format
    if fmt == "hf":
        from seqmix.models.pretrained import load_pretrained

        model, model_config, _ = load_pretrained(path)
    else:
        from seqmix.train.restore import restore_model

        model, run_config = restore_model(path)
        model_config = steps_lib.model_config_of(run_config)
        if model_config.get("kind", "causal_lm") != "causal_lm":
            raise ValueError(
                f"distill.teacher {path!r} trains a {model_config.get('kind')!r} model; a "
                "teacher is a causal LM"
            )
    model.eval()
    return Teacher(model, model_config, path, fmt)


def _convert(settings: Settings, teacher: Teacher, seed: int):
    from seqmix.models.convert import convert

    mixers = {settings.mixer: settings.mixer_overrides} if settings.mixer_overrides else None
    return convert(
        teacher.model,
        teacher.config,
        list(settings.plan),
        settings.mixer,
        mixers=mixers,
        decay_half_lives=settings.decay_half_lives,
        rngs=nnx.Rngs(seed),
    )


def _plain_dict(config) -> dict:
    return json.loads(ml_collections.ConfigDict(config).to_json_best_effort(sort_keys=True))


def prepare(config, teacher: Teacher):
    """``(config, student)``: ``config`` with ``model`` set to the student's model config
    (the conversion of the teacher by ``config.distill``) and ``train.num_steps`` to the
    stages' total when unset; ``student`` the converted ``Student``.

    A ``config.model`` that is already set must describe that student (ValueError naming
    what differs: the vocabulary, the width, the layers or a key); so must a
    ``train.num_steps`` that is set (the stages' total).
    """
    from seqmix.models.layerwise import check_pair

    settings = settings_of(config)
    student = _convert(settings, teacher, int(config.seed))
    config = ml_collections.ConfigDict(config.to_dict(), type_safe=False)
    if config.model is None or not config.model.keys():
        config.model = student.config
    else:
        abstract = nnx.eval_shape(lambda: steps_lib.build(config.model, 0))
        check_pair(teacher.model, abstract)
        ours, theirs = _plain_dict(config.model), _plain_dict(student.config)
        differ = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
        if differ:
            raise ValueError(
                f"config.model differs from the student that distill converts the teacher to "
                f"in {differ}; leave config.model empty to take the conversion's"
            )
    total = settings.num_steps
    if config.train.get("num_steps", None) is None:
        config.train.num_steps = total
    elif int(config.train.num_steps) != total:
        raise ValueError(
            f"train.num_steps={config.train.num_steps} but distill.stages add up to {total} steps"
        )
    return config, student


def check_student(teacher: Teacher, model_config, settings: Settings) -> None:
    """ValueError unless the student of ``model_config`` aligns with the teacher layer by
    layer: same vocabulary, width and depth; the planned layers attention in the teacher
    and ``settings.mixer`` in the student, every other layer the same mixer in both."""
    from seqmix.models.config import layer_names
    from seqmix.models.layerwise import check_pair

    abstract = nnx.eval_shape(lambda: steps_lib.build(model_config, 0))
    check_pair(teacher.model, abstract)
    ours, theirs = layer_names(model_config), tuple(teacher.model.layer_names)
    for i, (s, t) in enumerate(zip(ours, theirs, strict=True)):
        if i in settings.plan:
            if t != "attention" or s != settings.mixer:
                raise ValueError(
                    f"distill replaces layer {i}: the teacher's layer must be attention (is "
                    f"{t!r}) and the student's {settings.mixer!r} (is {s!r})"
                )
        elif s != t:
            raise ValueError(
                f"layer {i} is {s!r} in the student and {t!r} in the teacher; only the "
                f"layers of distill.stages ({list(settings.plan)}) differ"
            )


def initial_params(config, teacher: Teacher, settings: Settings, parts, student=None):
    """The student's step-0 parameters (an ``nnx.State`` like ``parts.params``): the
    conversion of the teacher, with the replaced mixers drawn from the seed instead when
    ``distill.init="random"``."""
    from seqmix.models.builder import model_from_params, model_params

    model_config = steps_lib.model_config_of(config)
    if student is None:
        student = _convert(settings, teacher, int(config.seed))
    flat = model_params(student.model)
    if settings.init == "random":
        seeded = model_params(steps_lib.build(model_config, int(config.seed)))
        for path in flat:
            if (
                path[:2] == ("backbone", "layers")
                and path[2] in settings.plan
                and path[3] == "mixer"
            ):
                flat[path] = seeded[path]
    params = steps_lib.split(model_from_params(model_config, flat))[1]
    want = jax.tree.structure(parts.params)
    if jax.tree.structure(params) != want:
        raise ValueError("the converted student's parameters do not match config.model")
    return params
