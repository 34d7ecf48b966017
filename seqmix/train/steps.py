"""The pieces of one training run that a loop, a sweep or a benchmark shares.

``build_program(config)`` turns an experiment config into a ``Program``: the model split
once into graph definitions and abstract state (``split_model``), the optimizer and its
schedule, the shardings of every piece of the training state on the config's mesh, and the
two jitted steps:

- ``program.train_step(state, rngs, batch, step) -> (state, metrics)``: one AdamW update of
  a ``TrainState`` (the state is donated); ``metrics`` holds float32 scalars ``loss``,
  ``accuracy``, ``grad_norm``, ``lr`` and the bool ``params_finite``;
- ``program.eval_step(params, rngs, other, batch) -> sums``: the loss sums of one evaluation
  batch (``seqmix.train.losses``), in eval mode.

``init_state(program, on_host=True)`` creates the concrete ``(TrainState, rngs)``; with
``on_host`` the initialiser runs on the host CPU and the arrays are then copied into their
shardings (XLA compiles a large model's initialiser for a GPU far more slowly than its
training step). ``program.abstract_args(batch)`` gives the step's arguments as
``jax.ShapeDtypeStruct`` with shardings, so that a separate process can compile exactly the
program a run will execute (``program.train_step.lower(*args).compile()``).

The jitted step is a pure function of pytrees: it merges the graph definition with the
state at trace time only. Dropout keys of step ``s`` are ``fold_in(fold_in(key(seed),
crc32(stream)), s)``, so a resumed run draws exactly the keys of an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from seqmix.train import losses
from seqmix.train import optimizer as optimizer_lib
from seqmix.train import sharding as sharding_lib


class TrainState(NamedTuple):
    """What a checkpoint holds besides the step: parameters, optimizer state and the model
    variables that are neither parameters nor RNG streams (``other``)."""

    params: nnx.State
    opt_state: optax.OptState
    other: nnx.State


class ModelParts(NamedTuple):
    """The model split once: graph definitions (train and eval mode) and abstract state."""

    graphdef_train: nnx.GraphDef
    graphdef_eval: nnx.GraphDef
    params: nnx.State
    rngs: nnx.State
    other: nnx.State
    rng_streams: tuple[str, ...]


def model_config_of(config) -> ml_collections.ConfigDict:
    """``config.model`` with ``train.compute_dtype`` (when set) as its compute ``dtype``."""
    model = ml_collections.ConfigDict(config.model.to_dict(), type_safe=False)
    dtype = config.train.get("compute_dtype", None) if "train" in config else None
    if dtype is not None:
        model.dtype = dtype
    return model


def build(model_config, seed: int):
    """The concrete model of ``model_config`` initialised from ``seed`` (eager sharding off:
    shardings are applied by the caller)."""
    from seqmix import models  # local: the registry imports every layer

    with nnx.use_eager_sharding(False):
        return models.build_model(model_config, rngs=nnx.Rngs(seed))


def split(model):
    """``(graphdef, params, rngs, other)`` of an NNX model."""
    return nnx.split(model, nnx.Param, nnx.RngState, ...)


def split_model(model_config, seed: int) -> ModelParts:
    """Abstract model split into graph definitions and abstract state (nothing allocated)."""
    abstract = nnx.eval_shape(lambda: build(model_config, seed))
    abstract.train()
    graphdef_train, params, rngs, other = split(abstract)
    abstract.eval()
    graphdef_eval = split(abstract)[0]
    streams = sorted(
        {
            str(path[-2])
            for path, _ in nnx.to_flat_state(rngs)
            if len(path) >= 2 and str(path[-1]) == "key"
        }
    )
    return ModelParts(graphdef_train, graphdef_eval, params, rngs, other, tuple(streams))


def merge(graphdef, params, rngs, other, streams, seed: int, step):
    """The model of ``graphdef`` with its state; RNG streams reseeded for ``step``."""
    model = nnx.merge(graphdef, params, rngs, other)
    if streams:
        base = jax.random.key(seed)
        nnx.reseed(
            model,
            **{
                name: jax.random.fold_in(jax.random.fold_in(base, zlib.crc32(name.encode())), step)
                for name in streams
            },
        )
    return model


def apply_model(model, batch: dict):
    """The model's output for a batch: ``model(inputs, segment_ids=..., positions=...)``
    with the optional keys the batch carries (``positions``: a causal LM's loss positions,
    logits are computed there only)."""
    kw = {}
    if "segment_ids" in batch:
        kw["segment_ids"] = batch["segment_ids"]
    if "positions" in batch:
        kw["positions"] = batch["positions"]
    return model(batch["inputs"], **kw)


def _all_finite(tree):
    leaves = [
        jnp.all(jnp.isfinite(x))
        for x in jax.tree.leaves(tree)
        if jnp.issubdtype(x.dtype, jnp.inexact)
    ]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def make_train_step(parts: ModelParts, tx, schedule, kind: str, seed: int, *, step_offset=0):
    """The pure update ``(state, rngs, batch, step) -> (state, metrics)``; ``kind`` is the
    task kind (``"causal_lm"`` or ``"classifier"``); the reported ``lr`` is
    ``schedule(step - step_offset - 1)`` (a fine-tune's schedule starts at its first step)."""

    def train_step(state: TrainState, rngs, batch, step):
        def loss_fn(params):
            model = merge(
                parts.graphdef_train, params, rngs, state.other, parts.rng_streams, seed, step
            )
            sums = losses.batch_sums(kind, apply_model(model, batch), batch)
            loss = sums["loss_sum"] / jnp.maximum(sums["count"], 1.0)
            new_other = split(model)[3]
            return loss, (sums, new_other)

        (loss, (sums, other)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            "loss": loss,
            "accuracy": sums["correct"] / jnp.maximum(sums["count"], 1.0),
            "grad_norm": optax.tree.norm(grads),
            "lr": schedule(step - step_offset - 1),
            "params_finite": _all_finite(params),
        }
        return TrainState(params, opt_state, other), metrics

    return train_step


def make_eval_step(parts: ModelParts, kind: str, seed: int):
    """The pure evaluation ``(params, rngs, other, batch) -> loss sums`` in eval mode."""

    def eval_step(params, rngs, other, batch):
        model = merge(parts.graphdef_eval, params, rngs, other, parts.rng_streams, seed, 0)
        return losses.batch_sums(kind, apply_model(model, batch), batch)

    return eval_step


@dataclasses.dataclass(frozen=True)
class Program:
    """One config's model, optimizer, shardings and jitted steps (see the module docstring).

    ``num_steps`` is the length of the schedule (``train.num_steps``); ``step_offset`` the
    step after which it starts (0, or the step a fine-tune starts from).

    Another objective plugs into the loop through a ``Program`` of its own (e.g.
    ``seqmix.train.distill.build_distill_program``) with the optional fields:
    ``initial_params`` (a function returning the step-0 parameters, instead of the seed's),
    ``eval_step_at`` (step -> the evaluation function for that step, when it changes over
    the run) and ``loss_is_cross_entropy`` (False: the training ``loss`` is another
    objective, and bits per byte come from a ``cross_entropy`` metric when the step reports
    one)."""

    config: Any
    model_config: Any
    seed: int
    kind: str
    num_steps: int
    step_offset: int
    parts: ModelParts
    mesh: jax.sharding.Mesh
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    state_shardings: TrainState
    rng_shardings: Any
    batch_sharding: jax.sharding.NamedSharding
    abstract_state: TrainState
    abstract_rngs: Any
    train_step: Any
    eval_step: Any
    initial_params: Any = None
    eval_step_at: Any = None
    loss_is_cross_entropy: bool = True

    def eval_step_for(self, step: int):
        """The evaluation function of the model at ``step``."""
        return self.eval_step if self.eval_step_at is None else self.eval_step_at(int(step))

    @property
    def num_params(self) -> int:
        return int(sum(np.prod(x.shape) for x in jax.tree.leaves(self.parts.params)))

    def abstract_batch(self, batch: dict) -> dict:
        """``batch`` (arrays or shapes) as ``ShapeDtypeStruct`` with the batch sharding."""
        return {
            k: jax.ShapeDtypeStruct(np.shape(v), v.dtype, sharding=self.batch_sharding)
            for k, v in batch.items()
        }

    def abstract_args(self, train_batch: dict, eval_batch: dict | None = None) -> dict:
        """``{"train": args of train_step, "eval": args of eval_step}`` as shapes with
        shardings: what ``lower(*args).compile()`` needs to compile the run's programs."""
        eval_batch = train_batch if eval_batch is None else eval_batch
        s = self.abstract_state
        return {
            "train": (
                s,
                self.abstract_rngs,
                self.abstract_batch(train_batch),
                jax.ShapeDtypeStruct((), jnp.int32),
            ),
            "eval": (s.params, self.abstract_rngs, s.other, self.abstract_batch(eval_batch)),
        }

    def put_batch(self, batch: dict) -> dict:
        """A host batch on the devices, split over the batch sharding."""
        return {k: jax.device_put(v, self.batch_sharding) for k, v in batch.items()}


def state_layout(parts: ModelParts, tx, mesh):
    """``(state shardings, rng shardings, batch sharding, abstract state, abstract rngs)``
    of a model's train state under optimizer ``tx`` on ``mesh``."""
    param_sh = sharding_lib.state_shardings(parts.params, mesh)
    rng_sh = jax.tree.map(lambda _: sharding_lib.replicated(mesh), parts.rngs)
    other_sh = sharding_lib.state_shardings(parts.other, mesh)
    opt_abstract = jax.eval_shape(tx.init, parts.params)
    opt_sh = sharding_lib.like_params_shardings(opt_abstract, parts.params, param_sh, mesh)
    state_sh = TrainState(param_sh, opt_sh, other_sh)
    abstract_state = sharding_lib.abstract_with(
        TrainState(parts.params, opt_abstract, parts.other), state_sh
    )
    abstract_rngs = sharding_lib.abstract_with(parts.rngs, rng_sh)
    return state_sh, rng_sh, sharding_lib.batch_sharding(mesh), abstract_state, abstract_rngs


def build_program(
    config, *, mesh=None, num_steps: int | None = None, step_offset: int = 0
) -> Program:
    """The ``Program`` of an experiment config (see ``seqmix.train.config``): nothing is
    allocated or compiled yet. ``mesh`` defaults to ``make_mesh(config.mesh)``;
    ``num_steps`` to ``config.train.num_steps``. ValueError (naming ``model``) for a model
    config that does not build."""
    seed = int(config.seed)
    num_steps = int(config.train.num_steps) if num_steps is None else int(num_steps)
    model_config = model_config_of(config)
    try:
        parts = split_model(model_config, seed)
    except ValueError as e:
        raise ValueError(f"model: {e}") from e
    mesh = sharding_lib.make_mesh(config.mesh) if mesh is None else mesh
    kind = str(config.model.get("kind", "causal_lm"))
    schedule = optimizer_lib.learning_rate_schedule(config.optimizer, num_steps)
    tx = optimizer_lib.make_optimizer(config.optimizer, num_steps)
    state_sh, rng_sh, batch_sh, abstract_state, abstract_rngs = state_layout(parts, tx, mesh)
    param_sh, other_sh = state_sh.params, state_sh.other
    train_step = jax.jit(
        make_train_step(parts, tx, schedule, kind, seed, step_offset=step_offset),
        in_shardings=(state_sh, rng_sh, batch_sh, None),
        out_shardings=(state_sh, None),
        donate_argnums=(0,),
    )
    eval_step = jax.jit(
        make_eval_step(parts, kind, seed), in_shardings=(param_sh, rng_sh, other_sh, batch_sh)
    )
    # mesh.seq > 1: the steps trace with the mesh active (context-parallel mixers)
    train_step = sharding_lib.sequence_parallel(mesh, train_step)
    eval_step = sharding_lib.sequence_parallel(mesh, eval_step)
    return Program(
        config=config,
        model_config=model_config,
        seed=seed,
        kind=kind,
        num_steps=num_steps,
        step_offset=int(step_offset),
        parts=parts,
        mesh=mesh,
        tx=tx,
        schedule=schedule,
        state_shardings=state_sh,
        rng_shardings=rng_sh,
        batch_sharding=batch_sh,
        abstract_state=abstract_state,
        abstract_rngs=abstract_rngs,
        train_step=train_step,
        eval_step=eval_step,
    )


def _host_device():
    return jax.devices("cpu")[0]


def init_model_state(model_config, seed: int, shardings, *, on_host: bool = True):
    """Concrete ``(params, rngs, other)`` of the model, placed in ``shardings`` (a tuple of
    three trees of shardings, or None: the default device). ``on_host``: initialised on the
    host CPU, then copied."""

    def init():
        _, params, rngs, other = split(build(model_config, seed))
        return params, rngs, other

    if on_host:
        with jax.default_device(_host_device()):
            made = jax.jit(init)()
        return made if shardings is None else jax.device_put(made, shardings)
    return jax.jit(init, out_shardings=shardings)()


def init_state(program: Program, *, on_host: bool = True) -> tuple[TrainState, Any]:
    """``(TrainState, rngs)`` at step 0 of ``program``: parameters from the seed (or
    ``program.initial_params()`` when the program has them), a fresh optimizer state; every
    array in its sharding. ``on_host`` (default): computed on the
    host CPU and copied over; otherwise one jitted initialiser writes the arrays straight
    into their shardings (no host copy; slow to compile for large models on a GPU)."""
    sh = program.state_shardings
    params, rngs, other = init_model_state(
        program.model_config,
        program.seed,
        (sh.params, program.rng_shardings, sh.other),
        on_host=on_host,
    )
    if program.initial_params is not None:
        params = jax.device_put(program.initial_params(), sh.params)
    if on_host:
        with jax.default_device(_host_device()):
            opt_state = jax.jit(program.tx.init)(jax.device_put(params, _host_device()))
        opt_state = jax.device_put(opt_state, sh.opt_state)
    else:
        opt_state = jax.jit(program.tx.init, out_shardings=sh.opt_state)(params)
    return TrainState(params, opt_state, other), rngs


def init_rngs(program: Program, *, on_host: bool = True):
    """The RNG-stream state of ``program``'s model (what a resumed run needs besides the
    checkpoint), in its shardings."""
    sh = program.state_shardings
    return init_model_state(
        program.model_config,
        program.seed,
        (sh.params, program.rng_shardings, sh.other),
        on_host=on_host,
    )[1]


def params_by_layer(parts: ModelParts, layer_names) -> list[tuple[str, int]]:
    """``(group, parameter count)`` rows: the embedding, each layer (``layer i (name)``,
    then its mixer, MLP and norms), the final norm and the head, in model order."""
    counts: dict[str, int] = {}
    order: list[str] = []

    def add(key, n):
        if key not in counts:
            counts[key] = 0
            order.append(key)
        counts[key] += n

    for path, value in nnx.to_flat_state(parts.params):
        names = [str(p) for p in path]
        n = int(np.prod(np.shape(value.get_value())))
        if len(names) >= 3 and names[0] == "backbone" and names[1] == "layers":
            i = int(names[2])
            part = names[3] if len(names) > 3 else ""
            add(f"layer {i} ({layer_names[i]})", n)
            add(f"layer {i} ({layer_names[i]}) {part}", n)
        elif names[0] == "backbone" and len(names) > 1:
            add(names[1], n)
        else:
            add(names[0], n)

    def rank(key: str):  # the embedding, the layers in order, then the rest
        if key.startswith("layer "):
            return (1, int(key.split()[1]), key)
        return (0 if key == "embed" else 2, 0, key)

    return [(k, counts[k]) for k in sorted(order, key=rank)]
