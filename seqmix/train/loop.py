"""``train_and_evaluate(config, workdir)``: the one training loop, and ``restore_model``.

The loop, in order:

1. Build the task and the mesh, validate the config (ValueError naming the key; nothing is
   compiled yet), write ``workdir/config.json``.
2. Build the model abstractly (``nnx.eval_shape``) and ``nnx.split`` it once into a graph
   definition and its state: parameters, RNG streams, other variables. The jitted step is a
   pure function of pytrees, ``(state, rngs, batch, step) -> (state, metrics)``; it merges the
   graph definition with the state at trace time only.
3. Resume from the newest readable checkpoint in ``workdir/checkpoints`` (a corrupt one is
   skipped with a warning and set aside), or initialise: parameters under ``jax.jit`` straight
   into their shardings, then the optimizer state.
4. For each step ``s = start + 1 .. num_steps``: the batch ``task.train_batch(s)`` (a pure
   function of ``(seed, s)``), one update whose dropout keys are ``fold_in(seed key, s)``; so a
   resumed run repeats an uninterrupted one bit for bit. Metrics of step ``s`` are read back
   after step ``s + 1`` is dispatched (the device never waits for the host), checked for
   NaN/Inf, logged to ``metrics.jsonl``, TensorBoard and the progress bar.
5. Every ``eval_every`` steps and at the end: the task's evaluation set; every
   ``checkpoint_every`` steps, at the end and on SIGTERM: an asynchronous checkpoint. A
   non-finite loss, gradient or parameter stops the run with ``FloatingPointError`` before
   anything non-finite is saved.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import math
import os
import signal
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from seqmix import data as data_lib
from seqmix.train import checkpoint as checkpoint_lib
from seqmix.train import config as config_lib
from seqmix.train import losses
from seqmix.train import metrics as metrics_lib
from seqmix.train import optimizer as optimizer_lib
from seqmix.train import sharding as sharding_lib

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"


class TrainState(NamedTuple):
    params: nnx.State
    opt_state: optax.OptState
    other: nnx.State  # variables that are neither parameters nor RNG streams


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


def _build(model_config, seed: int):
    from seqmix import models

    with nnx.use_eager_sharding(False):
        return models.build_model(model_config, rngs=nnx.Rngs(seed))


def _split(model):
    return nnx.split(model, nnx.Param, nnx.RngState, ...)


def split_model(model_config, seed: int) -> ModelParts:
    """Abstract model split into graph definitions and abstract state (nothing allocated)."""
    abstract = nnx.eval_shape(lambda: _build(model_config, seed))
    abstract.train()
    graphdef_train, params, rngs, other = _split(abstract)
    abstract.eval()
    graphdef_eval = _split(abstract)[0]
    streams = sorted(
        {
            str(path[-2])
            for path, _ in nnx.to_flat_state(rngs)
            if len(path) >= 2 and str(path[-1]) == "key"
        }
    )
    return ModelParts(graphdef_train, graphdef_eval, params, rngs, other, tuple(streams))


def _init_state(model_config, seed: int, shardings):
    """Concrete ``(params, rngs, other)`` created under jit directly in their shardings."""

    def init():
        _, params, rngs, other = _split(_build(model_config, seed))
        return params, rngs, other

    return jax.jit(init, out_shardings=shardings)()


def _merge(graphdef, params, rngs, other, streams, seed, step):
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


def _call(model, batch):
    kw = {}
    if "segment_ids" in batch:
        kw["segment_ids"] = batch["segment_ids"]
    if "positions" in batch:  # a causal LM's loss positions: logits only there
        kw["positions"] = batch["positions"]
    return model(batch["inputs"], **kw)


def _all_finite(tree):
    leaves = [
        jnp.all(jnp.isfinite(x))
        for x in jax.tree.leaves(tree)
        if jnp.issubdtype(x.dtype, jnp.inexact)
    ]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def make_train_step(parts: ModelParts, tx, schedule, kind: str, seed: int):
    """The pure update ``(state, rngs, batch, step) -> (state, metrics)``."""

    def train_step(state: TrainState, rngs, batch, step):
        def loss_fn(params):
            model = _merge(
                parts.graphdef_train, params, rngs, state.other, parts.rng_streams, seed, step
            )
            sums = losses.batch_sums(kind, _call(model, batch), batch)
            loss = sums["loss_sum"] / jnp.maximum(sums["count"], 1.0)
            new_other = _split(model)[3]
            return loss, (sums, new_other)

        (loss, (sums, other)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        grad_norm = optax.tree.norm(grads)
        metrics = {
            "loss": loss,
            "accuracy": sums["correct"] / jnp.maximum(sums["count"], 1.0),
            "grad_norm": grad_norm,
            "lr": schedule(step - 1),
            "params_finite": _all_finite(params),
        }
        return TrainState(params, opt_state, other), metrics

    return train_step


def make_eval_step(parts: ModelParts, kind: str, seed: int):
    def eval_step(params, rngs, other, batch):
        model = _merge(parts.graphdef_eval, params, rngs, other, parts.rng_streams, seed, 0)
        return losses.batch_sums(kind, _call(model, batch), batch)

    return eval_step


def save_config(config, workdir: str) -> None:
    path = os.path.join(workdir, CONFIG_FILE)
    text = config.to_json_best_effort(indent=2, sort_keys=True)
    if os.path.exists(path):
        with open(path) as f:
            if f.read() != text:
                logging.warning(
                    "%s differs from the config of this run; overwriting it (the "
                    "checkpoints were made with the old one)",
                    path,
                )
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def load_config(workdir: str) -> ml_collections.ConfigDict:
    with open(os.path.join(workdir, CONFIG_FILE)) as f:
        return ml_collections.ConfigDict(json.load(f))


class _StopFlag:
    """Set by SIGTERM (the handler only records it; the loop saves and returns)."""

    def __init__(self):
        self.signal: int | None = None
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        del frame
        self.signal = signum

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
        return False


def _put(batch: dict, sharding) -> dict:
    return {k: jax.device_put(v, sharding) for k, v in batch.items()}


def _evaluate(eval_step, state, rngs, eval_set, task) -> dict:
    totals = None
    for batch in eval_set:
        sums = eval_step(state.params, rngs, state.other, batch)
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    totals = jax.device_get(totals)
    return losses.finish(totals, bits_per_byte=task.bits_per_byte)


def train_and_evaluate(
    config, workdir: str, *, callbacks: Sequence[Callable[[int, dict], None]] = ()
) -> dict:
    """Trains ``config`` in ``workdir`` (resuming from its checkpoints) and evaluates.

    ``callbacks``: functions ``fn(step, metrics)`` called on the host with each step's metrics.
    Returns ``{"step", "eval" (the last evaluation's metrics), "stopped_by" (None or
    "SIGTERM"), "workdir"}``. Raises ValueError for a bad config (before compiling) and
    FloatingPointError when the loss, gradients or parameters become non-finite.
    """
    t_start = time.time()
    task = data_lib.make_task(config)
    mesh = sharding_lib.make_mesh(config.mesh)
    config_lib.validate(config, task=task, num_devices=len(jax.devices()))
    train_cfg, seed = config.train, int(config.seed)
    num_steps = int(train_cfg.num_steps)
    model_config = model_config_of(config)
    try:  # abstract: surfaces model config errors before anything is written or compiled
        parts = split_model(model_config, seed)
    except ValueError as e:
        raise ValueError(f"model: {e}") from e
    workdir = os.path.abspath(os.path.expanduser(workdir))
    os.makedirs(workdir, exist_ok=True)
    save_config(config, workdir)
    num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(parts.params))
    logging.info(
        "model: %s parameters, mesh %s, %d steps of %d x %d tokens",
        f"{num_params:,}",
        sharding_lib.describe(mesh),
        num_steps,
        task.batch_size,
        task.seq_len,
    )

    # Shardings, optimizer, abstract targets.
    param_sh = sharding_lib.state_shardings(parts.params, mesh)
    rng_sh = jax.tree.map(lambda _: sharding_lib.replicated(mesh), parts.rngs)
    other_sh = sharding_lib.state_shardings(parts.other, mesh)
    schedule = optimizer_lib.learning_rate_schedule(config.optimizer, num_steps)
    tx = optimizer_lib.make_optimizer(config.optimizer, num_steps)
    opt_abstract = jax.eval_shape(tx.init, parts.params)
    opt_sh = sharding_lib.like_params_shardings(opt_abstract, parts.params, param_sh, mesh)
    state_sh = TrainState(param_sh, opt_sh, other_sh)
    abstract_state = sharding_lib.abstract_with(
        TrainState(parts.params, opt_abstract, parts.other), state_sh
    )
    batch_sh = sharding_lib.batch_sharding(mesh)

    metric_mode = task.metric_mode
    checkpoints = checkpoint_lib.Checkpoints(
        os.path.join(workdir, CHECKPOINT_DIR),
        keep=int(train_cfg.keep),
        metric=task.metric,
        metric_mode=metric_mode,
        async_save=bool(train_cfg.get("async_checkpoints", True)),
    )
    writer = metrics_lib.MetricsWriter(workdir)
    prefetch = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    try:
        start, items = checkpoints.restore_latest(
            {
                "params": abstract_state.params,
                "train": {"opt_state": abstract_state.opt_state, "other": abstract_state.other},
            },
            set_aside_corrupt=True,
        )
        if start is None:
            params, rngs, other = _init_state(model_config, seed, (param_sh, rng_sh, other_sh))
            opt_state = jax.jit(tx.init, out_shardings=opt_sh)(params)
            state = TrainState(params, opt_state, other)
            start = 0
            logging.info("starting from scratch in %s", workdir)
        else:
            state = TrainState(
                items["params"], items["train"]["opt_state"], items["train"]["other"]
            )
            rngs = _init_rngs(model_config, seed, rng_sh)
            logging.info("resumed from step %d of %s", start, checkpoints.directory)
        if start > num_steps:
            raise ValueError(
                f"train.num_steps={num_steps} is below the step {start} of the "
                f"latest checkpoint in {checkpoints.directory}"
            )

        train_step = jax.jit(
            make_train_step(parts, tx, schedule, task.kind, seed),
            in_shardings=(state_sh, rng_sh, batch_sh, None),
            out_shardings=(state_sh, None),
            donate_argnums=(0,),
        )
        eval_step = jax.jit(
            make_eval_step(parts, task.kind, seed),
            in_shardings=(param_sh, rng_sh, other_sh, batch_sh),
        )
        eval_set = [_put(b, batch_sh) for b in task.eval_batches()]

        return _run(
            state=state,
            rngs=rngs,
            start=start,
            num_steps=num_steps,
            task=task,
            train_cfg=train_cfg,
            train_step=train_step,
            eval_step=eval_step,
            eval_set=eval_set,
            batch_sh=batch_sh,
            checkpoints=checkpoints,
            writer=writer,
            prefetch=prefetch,
            callbacks=callbacks,
            workdir=workdir,
            t_start=t_start,
        )
    finally:
        prefetch.shutdown(wait=False, cancel_futures=True)
        checkpoints.close()
        writer.close()


def _init_rngs(model_config, seed, rng_sh):
    def init():
        return _split(_build(model_config, seed))[2]

    return jax.jit(init, out_shardings=rng_sh)()


def _run(
    *,
    state,
    rngs,
    start,
    num_steps,
    task,
    train_cfg,
    train_step,
    eval_step,
    eval_set,
    batch_sh,
    checkpoints,
    writer,
    prefetch,
    callbacks,
    workdir,
    t_start,
) -> dict:
    eval_every = int(train_cfg.eval_every)
    checkpoint_every = int(train_cfg.checkpoint_every)
    log_every = int(train_cfg.log_every)
    progress = metrics_lib.ProgressBar(num_steps, start, every=log_every)
    last_saved = start if start > 0 else None
    last_eval: dict | None = None
    window: dict[str, float] = {}
    window_steps, window_t0 = 0, time.time()
    step_of_state = start
    stopped_by = None

    def handle(step: int, metrics) -> None:
        nonlocal window_steps, window_t0, window
        metrics = jax.device_get(metrics)
        loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
        if not (
            math.isfinite(loss) and math.isfinite(grad_norm) and bool(metrics["params_finite"])
        ):
            checkpoints.wait()
            good = checkpoints.all_steps()
            where = (
                f"the last good checkpoint is step {good[-1]} in {checkpoints.directory}"
                if good
                else "no checkpoint was saved"
            )
            what = (
                f"the loss is {loss}"
                if not math.isfinite(loss)
                else f"the gradient norm is {grad_norm} (loss {loss:.4g})"
                if not math.isfinite(grad_norm)
                else f"the parameters became non-finite (loss {loss:.4g})"
            )
            raise FloatingPointError(
                f"training stopped at step {step}: {what}. Nothing non-finite was saved; "
                f"{where}. Lower optimizer.lr, raise optimizer.warmup_steps or set "
                f"optimizer.clip_norm, then rerun to resume from that checkpoint."
            )
        scalars = {k: float(v) for k, v in metrics.items() if k != "params_finite"}
        for fn in callbacks:
            fn(step, scalars)
        for k, v in scalars.items():
            window[k] = window.get(k, 0.0) + v
        window_steps += 1
        now = time.time()
        tok_s = window_steps * task.tokens_per_batch / max(now - window_t0, 1e-9)
        progress.update(
            step,
            {"loss": window["loss"] / window_steps, "acc": window["accuracy"] / window_steps},
            tok_s,
        )
        if step % log_every == 0 or step == num_steps:
            means = {k: v / window_steps for k, v in window.items()}
            means["tokens_per_second"] = tok_s
            if task.bits_per_byte:
                means["bits_per_byte"] = means["loss"] / math.log(2.0)
            writer.write(step, "train", means)
            window, window_steps, window_t0 = {}, 0, now

    def evaluate(step: int) -> dict:
        result = _evaluate(eval_step, state, rngs, eval_set, task)
        writer.write(step, "eval", result)
        writer.flush()
        progress.write(f"eval step {step}: " + " ".join(f"{k} {v:.4f}" for k, v in result.items()))
        return result

    def save(step: int, eval_metrics: dict | None) -> None:
        nonlocal last_saved
        if last_saved == step:
            return
        checkpoints.save(
            step,
            {"params": state.params, "train": {"opt_state": state.opt_state, "other": state.other}},
            metrics=eval_metrics,
        )
        last_saved = step

    with _StopFlag() as stop:
        pending = None
        future = prefetch.submit(task.train_batch, start + 1) if start < num_steps else None
        for step in range(start + 1, num_steps + 1):
            host_batch = future.result()
            if step < num_steps:
                future = prefetch.submit(task.train_batch, step + 1)
            state, metrics = train_step(state, rngs, _put(host_batch, batch_sh), np.int32(step))
            step_of_state = step
            if pending is not None:
                handle(*pending)
            pending = (step, metrics)
            do_eval = step == num_steps or (eval_every and step % eval_every == 0)
            do_save = (
                step == num_steps
                or stop.signal is not None
                or (checkpoint_every and step % checkpoint_every == 0)
            )
            if do_eval or do_save:
                handle(*pending)
                pending = None
                t_pause = time.time()
                eval_metrics = evaluate(step) if do_eval else None
                if eval_metrics is not None:
                    last_eval = eval_metrics
                if do_save:
                    save(step, eval_metrics)
                window_t0 += time.time() - t_pause  # tokens/s counts training time only
            if stop.signal is not None:
                stopped_by = "SIGTERM"
                progress.write(
                    f"SIGTERM at step {step}: checkpoint saved in "
                    f"{checkpoints.directory}; run the same command to resume"
                )
                break
        if pending is not None:
            handle(*pending)
        if last_eval is None and stopped_by is None:  # resumed at the end: evaluate once
            last_eval = evaluate(step_of_state)
        checkpoints.wait()
    writer.flush()
    logging.info("finished at step %d in %.1f s", step_of_state, time.time() - t_start)
    return {
        "step": step_of_state,
        "eval": last_eval,
        "stopped_by": stopped_by,
        "workdir": workdir,
        "metric": task.metric,
    }


def restore_model(workdir: str, step: int | None = None, *, mesh_config=None):
    """``(model, config)`` from a workdir's checkpoint (the newest readable one when ``step``
    is None), in eval mode. Parameters land on the default device, or sharded over
    ``make_mesh(mesh_config)`` when a mesh config is given (any mesh, whatever the one the
    run used)."""
    workdir = os.path.abspath(os.path.expanduser(workdir))
    config = load_config(workdir)
    model_config = model_config_of(config)
    seed = int(config.seed)
    parts = split_model(model_config, seed)
    if mesh_config is None:
        mesh = sharding_lib.make_mesh(ml_collections.ConfigDict({"data": 1, "fsdp": 1}))
    else:
        mesh = sharding_lib.make_mesh(mesh_config)
    param_sh = sharding_lib.state_shardings(parts.params, mesh)
    rng_sh = jax.tree.map(lambda _: sharding_lib.replicated(mesh), parts.rngs)
    other_sh = sharding_lib.state_shardings(parts.other, mesh)
    directory = os.path.join(workdir, CHECKPOINT_DIR)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"no checkpoints in {workdir} (expected {directory})")
    checkpoints = checkpoint_lib.Checkpoints(directory, read_only=True, async_save=False)
    try:
        targets = {"params": sharding_lib.abstract_with(parts.params, param_sh)}
        found, items = checkpoints.restore_latest(targets, step=step)
        if found is None:
            raise FileNotFoundError(f"no checkpoint in {directory}")
        other_targets = {"train": {"other": sharding_lib.abstract_with(parts.other, other_sh)}}
        other = (
            checkpoints.restore(found, other_targets)["train"]["other"]
            if jax.tree.leaves(parts.other)
            else parts.other
        )
    finally:
        checkpoints.close()
    rngs = _init_rngs(model_config, seed, rng_sh)
    model = nnx.merge(parts.graphdef_eval, items["params"], rngs, other)
    logging.info("restored %s at step %d", workdir, found)
    return model, config


__all__ = ["TrainState", "restore_model", "train_and_evaluate"]
