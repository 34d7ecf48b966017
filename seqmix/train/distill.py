"""Distillation of a trained transformer (the teacher) into a converted hybrid (the student),
as an objective of the one training loop: ``train_and_evaluate(config, workdir,
program_builder=program_builder(teacher, student))``.

The student is ``seqmix.models.convert.convert`` of the teacher: the attention layers of
the plan become ``distill.mixer`` initialised from their weights; everything else is the
teacher's. Training runs through stages (``distill.stages``, a string
``"<kind>:<layers>:<steps>;..."``, layers joined by ``+``), each naming the replaced layers
in force during it (the other planned layers keep the teacher's attention) and its
objective:

- ``transfer`` (attention transfer): the teacher frozen, each replaced layer's mixer
  applied to the teacher's own hidden states (the input of that layer's attention in the
  teacher's forward pass) and trained to reproduce the attention's output:
  ``loss = mean_i mean_{b,t} mean_d (mixer_i(h_i) - attention_i(h_i))^2`` over the counted
  positions (the batch ``mask``); only the replaced layers' mixer parameters train.
- ``e2e`` (end to end): the student's logits against the teacher's,
  ``loss = kl_weight * T^2 * KL(softmax(teacher / T) || softmax(student / T)) +
  ce_weight * cross_entropy(student)``; the replaced mixers train, and every layer's MLP
  when ``distill.train_mlps``; the rest stays the teacher's.

A progressive schedule is a list of stages whose layer sets grow
(``"transfer:3:100;e2e:3:100;transfer:2+3:100;e2e:2+3:100"``). Each stage has its own
optimizer schedule (``config.optimizer`` over the stage's steps): the optimizer state is
reset at a stage's first step, and parameters outside the stage's trainable set are left
bit for bit as they were. The checkpoint is the loop's (the student's ``TrainState``);
the teacher is loaded, never saved, and enters every step as an input (neither donated
nor baked into the compiled program). A resumed run repeats an uninterrupted one bit for
bit: the stage of a step is a function of the step.

Metrics (``metrics.jsonl``): training lines carry ``loss`` (the stage's objective),
``stage`` (its index), ``align_layer<i>`` (transfer: each layer's mean squared error) or
``kl`` (at temperature 1), ``cross_entropy``, ``accuracy`` and ``bits_per_byte`` (e2e);
evaluation lines, on the task's held-out batches with the stage's model, carry the
student's ``loss`` (cross-entropy), ``accuracy``, ``bits_per_byte`` (byte tasks), ``kl``
(temperature 1), ``align_layer<i>`` for the stage's layers, and ``stage``.

``config.distill`` (see ``seqmix/configs/distill.py``): ``teacher`` (a seqmix run directory
of a trained causal LM, or a local Hugging Face checkpoint directory), ``teacher_format``
(``"auto"``, ``"seqmix"``, ``"hf"``), ``mixer`` (the target mixer), ``mixer_overrides``
(keys of ``model.mixers.<mixer>``, or None), ``decay_half_lives``, ``init``
(``"attention"``: converted from the teacher's weights; ``"random"``: the mixers drawn
from the seed, an ablation), ``stages``, ``temperature``, ``kl_weight``, ``ce_weight``,
``train_mlps``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from seqmix.train import losses
from seqmix.train import optimizer as optimizer_lib
from seqmix.train import sharding as sharding_lib
from seqmix.train import steps as steps_lib
from seqmix.train.distill_config import (
    FORMATS,
    INITS,
    KINDS,
    Settings,
    Stage,
    defaults,
    parse_stages,
    settings_of,
)
from seqmix.train.steps import Program, TrainState
from seqmix.train.teacher import (
    Teacher,
    check_student,
    initial_params,
    load_teacher,
    prepare,
    teacher_format,
)

__all__ = [
    "FORMATS",
    "INITS",
    "KINDS",
    "Settings",
    "Stage",
    "StagedTrainStep",
    "Teacher",
    "build_distill_program",
    "check_student",
    "defaults",
    "initial_params",
    "load_teacher",
    "make_stage_eval",
    "make_stage_step",
    "parse_stages",
    "prepare",
    "program_builder",
    "settings_of",
    "teacher_format",
    "teacher_pass",
    "trainable_mask",
]


def _names(path) -> list[str]:
    return optimizer_lib._path_names(path)


def trainable_mask(params, stage: Stage, *, train_mlps: bool):
    """A tree of Python bools like ``params``: True for what ``stage`` trains (the mixers of
    its layers; in ``e2e`` stages every MLP too when ``train_mlps``)."""
    layers = {str(i) for i in stage.layers}

    def one(path, _):
        names = _names(path)
        if len(names) < 4 or names[:2] != ["backbone", "layers"]:
            return False
        if names[3] == "mixer":
            return names[2] in layers
        return stage.kind == "e2e" and train_mlps and names[3] == "mlp"

    return jax.tree_util.tree_map_with_path(one, params)


def teacher_pass(teacher, tokens, layers, *, segment_ids=None, logits: bool = True):
    """One forward pass of the teacher: ``(inputs, outputs, logits)`` with ``inputs[i]`` the
    hidden states layer ``i``'s mixer receives (``[B, T, d_model]``), ``outputs[i]`` what the
    mixer returns, and the float32 logits ``[B, T, vocab]`` (None when ``logits`` is False:
    the pass stops after the last of ``layers``)."""
    backbone = teacher.backbone
    wanted = set(int(i) for i in layers)
    last = max(wanted) if wanted else -1
    x = backbone.embed(tokens)
    inputs, outputs = {}, {}
    for i, block in enumerate(backbone.layers):
        if not logits and i > last:
            break
        x = x.astype(jnp.float32)
        if i not in wanted:
            x = block(x, segment_ids=segment_ids)
            continue
        # Block.__call__ with its mixer's input and output kept
        h = block.norm(x)
        y = block.mixer(h, segment_ids=segment_ids)
        inputs[i], outputs[i] = h, y
        x = x + y.astype(jnp.float32)
        if block.mlp is not None:
            x = x + block.mlp(block.mlp_norm(x)).astype(jnp.float32)
    if not logits:
        return inputs, outputs, None
    h = backbone.final_norm(x)
    out = backbone.embed.attend(h) if teacher.head is None else teacher.head(h)
    return inputs, outputs, out.astype(jnp.float32)


def _position_mse(pred, target):
    """Mean over channels of the squared error: ``[B, T]`` float32."""
    diff = pred.astype(jnp.float32) - jax.lax.stop_gradient(target.astype(jnp.float32))
    return jnp.mean(jnp.square(diff), axis=-1)


def _position_kl(teacher_logits, student_logits, temperature: float):
    """``KL(softmax(t / T) || softmax(s / T))`` per position, ``[B, T]`` float32."""
    t = jax.nn.log_softmax(jax.lax.stop_gradient(teacher_logits) / temperature, axis=-1)
    s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    return jnp.sum(jnp.exp(t) * (t - s), axis=-1)


def _student_logits(student, teacher, batch, stage: Stage, plan):
    """The stage's student: the planned layers not yet replaced keep the teacher's attention."""
    from seqmix.models.layerwise import forward_with

    kept = {i: teacher.backbone.layers[i].mixer for i in plan if i not in stage.layers}
    return forward_with(student, batch["inputs"], kept, segment_ids=batch.get("segment_ids"))


def _masked_mean(x, mask):
    return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def make_stage_step(
    parts, teacher_graphdef, stage: Stage, settings: Settings, tx, schedule, seed: int
):
    """The pure update of one stage: ``(state, rngs, batch, step, teacher_state) ->
    (state, metrics)`` with ``teacher_state = (params, rngs, other)`` of the teacher."""
    plan = settings.plan
    temperature = settings.temperature

    def step_fn(state: TrainState, rngs, batch, step, teacher_state):
        teacher = nnx.merge(teacher_graphdef, *teacher_state)
        mask = batch["mask"].astype(jnp.float32)
        segment_ids = batch.get("segment_ids")
        mask_tree = trainable_mask(state.params, stage, train_mlps=settings.train_mlps)
        if stage.kind == "transfer":
            inputs, targets, _ = teacher_pass(
                teacher, batch["inputs"], stage.layers, segment_ids=segment_ids, logits=False
            )
        else:
            _, _, teacher_logits = teacher_pass(
                teacher, batch["inputs"], (), segment_ids=segment_ids
            )

        def loss_fn(params):
            student = steps_lib.merge(
                parts.graphdef_train, params, rngs, state.other, parts.rng_streams, seed, step
            )
            aux = {}
            if stage.kind == "transfer":
                per_layer = []
                for i in stage.layers:
                    pred = student.backbone.layers[i].mixer(inputs[i], segment_ids=segment_ids)
                    mse = _masked_mean(_position_mse(pred, targets[i]), mask)
                    aux[f"align_layer{i}"] = mse
                    per_layer.append(mse)
                loss = jnp.mean(jnp.stack(per_layer))
            else:
                logits = _student_logits(student, teacher, batch, stage, plan)
                kl_t = _masked_mean(_position_kl(teacher_logits, logits, temperature), mask)
                sums = losses.token_sums(logits, batch["targets"], batch["mask"])
                count = jnp.maximum(sums["count"], 1.0)
                ce = sums["loss_sum"] / count
                loss = settings.kl_weight * temperature**2 * kl_t + settings.ce_weight * ce
                aux["kl"] = (
                    kl_t
                    if temperature == 1.0
                    else _masked_mean(_position_kl(teacher_logits, logits, 1.0), mask)
                )
                aux["cross_entropy"] = ce
                aux["accuracy"] = sums["correct"] / count
            return loss, (aux, steps_lib.split(student)[3])

        (loss, (aux, other)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        grads = jax.tree.map(lambda m, g: g if m else jnp.zeros_like(g), mask_tree, grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        moved = optax.apply_updates(state.params, updates)
        params = jax.tree.map(lambda m, new, old: new if m else old, mask_tree, moved, state.params)
        metrics = {
            "loss": loss,
            "stage": jnp.asarray(stage.index, jnp.float32),
            "grad_norm": optax.tree.norm(grads),
            "lr": schedule(step - stage.first),
            "params_finite": steps_lib._all_finite(params),
            **aux,
        }
        return TrainState(params, opt_state, other), metrics

    return step_fn


def make_stage_eval(parts, teacher_graphdef, stage: Stage, settings: Settings, seed: int):
    """The pure evaluation of one stage's student: ``(params, rngs, other, batch,
    teacher_state) -> sums`` (``seqmix.train.losses`` sums of its cross-entropy, plus
    ``kl_sum`` at temperature 1, ``align_layer<i>_sum`` and ``stage_sum``)."""
    plan = settings.plan

    def eval_fn(params, rngs, other, batch, teacher_state):
        teacher = nnx.merge(teacher_graphdef, *teacher_state)
        student = steps_lib.merge(
            parts.graphdef_eval, params, rngs, other, parts.rng_streams, seed, 0
        )
        mask = batch["mask"].astype(jnp.float32)
        segment_ids = batch.get("segment_ids")
        inputs, targets, teacher_logits = teacher_pass(
            teacher, batch["inputs"], stage.layers, segment_ids=segment_ids
        )
        logits = _student_logits(student, teacher, batch, stage, plan)
        sums = losses.token_sums(logits, batch["targets"], batch["mask"])
        sums["kl_sum"] = jnp.sum(_position_kl(teacher_logits, logits, 1.0) * mask)
        for i in stage.layers:
            pred = student.backbone.layers[i].mixer(inputs[i], segment_ids=segment_ids)
            sums[f"align_layer{i}_sum"] = jnp.sum(_position_mse(pred, targets[i]) * mask)
        sums["stage_sum"] = stage.index * sums["count"]  # "stage" in the evaluation's line
        return sums

    return eval_fn


class StagedTrainStep:
    """``(state, rngs, batch, step) -> (state, metrics)``: the jitted update of the stage
    that ``step`` belongs to, the teacher's state passed in; at a stage's first step the
    optimizer state is reset (the stage's own schedule starts)."""

    def __init__(self, stages, steps, resets, teacher_state):
        self.stages, self.steps, self.resets = stages, steps, resets
        self.teacher_state = teacher_state

    def stage_at(self, step: int) -> Stage:
        for stage in self.stages:
            if stage.first <= step <= stage.last:
                return stage
        raise ValueError(
            f"step {step} is outside distill.stages (steps {self.stages[0].first}.."
            f"{self.stages[-1].last})"
        )

    def __call__(self, state, rngs, batch, step):
        stage = self.stage_at(int(step))
        if int(step) == stage.first:
            state = TrainState(state.params, self.resets[stage.index](state.params), state.other)
        return self.steps[stage.index](state, rngs, batch, step, self.teacher_state)


def build_distill_program(
    config,
    teacher: Teacher,
    *,
    student=None,
    mesh=None,
    step_offset: int = 0,
) -> Program:
    """The ``Program`` of a distillation config (see the module docstring) for
    ``train_and_evaluate``: the student of ``config.model`` (``prepare`` sets it), the
    teacher's state on the mesh, one jitted update and evaluation per stage.

    ``student`` (from ``prepare``) supplies the step-0 parameters; without it they are
    converted from the teacher when a run starts. ValueError (before compiling) for a bad
    ``distill`` section, a student that does not align with the teacher (vocabulary,
    width, depth, layers) or ``train.num_steps`` other than the stages' total.
    """
    seed = int(config.seed)
    settings = settings_of(config, offset=step_offset)
    model_config = steps_lib.model_config_of(config)
    if model_config.get("kind", "causal_lm") != "causal_lm":
        raise ValueError(f"model.kind must be 'causal_lm' to distil, got {model_config.kind!r}")
    check_student(teacher, model_config, settings)
    num_steps = settings.num_steps
    if int(config.train.num_steps) != num_steps:
        raise ValueError(
            f"train.num_steps={config.train.num_steps} but distill.stages add up to "
            f"{num_steps} steps"
        )
    for stage in settings.stages:
        try:
            optimizer_lib.validate(config.optimizer, stage.steps)
        except ValueError as e:
            raise ValueError(
                f"distill.stages: stage {stage.index} ({stage.steps} steps): {e}"
            ) from None
    try:
        parts = steps_lib.split_model(model_config, seed)
    except ValueError as e:
        raise ValueError(f"model: {e}") from e
    mesh = sharding_lib.make_mesh(config.mesh) if mesh is None else mesh
    txs = [optimizer_lib.make_optimizer(config.optimizer, s.steps) for s in settings.stages]
    schedules = [
        optimizer_lib.learning_rate_schedule(config.optimizer, s.steps) for s in settings.stages
    ]
    state_sh, rng_sh, batch_sh, abstract_state, abstract_rngs = steps_lib.state_layout(
        parts, txs[0], mesh
    )
    param_sh, opt_sh, other_sh = state_sh

    t_graphdef, t_params, t_rngs, t_other = steps_lib.split(teacher.model)
    t_sh = (
        sharding_lib.state_shardings(t_params, mesh),
        jax.tree.map(lambda _: sharding_lib.replicated(mesh), t_rngs),
        sharding_lib.state_shardings(t_other, mesh),
    )
    teacher_state = jax.device_put((t_params, t_rngs, t_other), t_sh)

    train_steps, resets, evals = [], [], []
    for stage, tx, schedule in zip(settings.stages, txs, schedules, strict=True):
        step = jax.jit(
            make_stage_step(parts, t_graphdef, stage, settings, tx, schedule, seed),
            in_shardings=(state_sh, rng_sh, batch_sh, None, t_sh),
            out_shardings=(state_sh, None),
            donate_argnums=(0,),
        )
        train_steps.append(sharding_lib.sequence_parallel(mesh, step))
        resets.append(jax.jit(tx.init, out_shardings=opt_sh))
        ev = jax.jit(
            make_stage_eval(parts, t_graphdef, stage, settings, seed),
            in_shardings=(param_sh, rng_sh, other_sh, batch_sh, t_sh),
        )
        evals.append(sharding_lib.sequence_parallel(mesh, ev))
    train_step = StagedTrainStep(settings.stages, train_steps, resets, teacher_state)

    def eval_step_at(step: int):
        stage = train_step.stage_at(
            min(max(int(step), settings.stages[0].first), settings.stages[-1].last)
        )
        fn = evals[stage.index]
        return lambda params, rngs, other, batch: fn(params, rngs, other, batch, teacher_state)

    return Program(
        config=config,
        model_config=model_config,
        seed=seed,
        kind="causal_lm",
        num_steps=num_steps,
        step_offset=int(step_offset),
        parts=parts,
        mesh=mesh,
        tx=txs[0],
        schedule=schedules[0],
        state_shardings=state_sh,
        rng_shardings=rng_sh,
        batch_sharding=batch_sh,
        abstract_state=abstract_state,
        abstract_rngs=abstract_rngs,
        train_step=train_step,
        eval_step=eval_step_at(settings.stages[-1].last),
        initial_params=lambda: initial_params(config, teacher, settings, parts, student),
        eval_step_at=eval_step_at,
        loss_is_cross_entropy=False,
    )


def program_builder(teacher: Teacher, student=None):
    """``fn(config, *, mesh, step_offset) -> Program`` for ``train_and_evaluate``'s
    ``program_builder``: distillation from ``teacher`` (``student`` from ``prepare``)."""

    def build(config, *, mesh=None, step_offset: int = 0) -> Program:
        return build_distill_program(
            config, teacher, student=student, mesh=mesh, step_offset=step_offset
        )

    return build
