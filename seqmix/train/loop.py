"""``train_and_evaluate(config, workdir)``: the one training loop.

The loop, in order:

1. Build the task and the mesh, validate the config (ValueError naming the key; nothing is
   compiled yet), and compare it with the run recorded in ``workdir``
   (``seqmix.train.workdir``): a config whose identity (seed, model, data, optimizer) differs
   is refused before anything is written, unless ``on_config_change`` asks for a fine-tune
   or a fresh run.
2. ``build_program``: the model split once into graph definitions and abstract state, the
   optimizer, the shardings and the jitted steps (``seqmix.train.steps``).
3. Resume from the newest readable checkpoint in ``workdir/checkpoints`` (a corrupt one is
   skipped with a warning and set aside), or initialise (``init_state``: on the host, then
   copied into the shardings). Then the start is recorded in ``config.json`` (a new run) or
   ``config_history.jsonl``, and the parameters per layer are logged.
4. For each step ``s = start + 1 .. last``: the batch ``task.train_batch(s)`` (a pure
   function of ``(seed, s)``), one update whose dropout keys are ``fold_in(seed key, s)``; so
   a resumed run repeats an uninterrupted one bit for bit. The first step includes
   compilation: it is timed and logged apart, and tokens/s and ms/step count the steps after
   it. Metrics of step ``s`` are read back after step ``s + 1`` is dispatched (the device
   never waits for the host), checked for NaN/Inf, logged to ``metrics.jsonl``, TensorBoard
   and the progress bar, and handed to the callbacks (``seqmix.train.callbacks``).
5. Every ``eval_every`` steps and at the end: the task's evaluation set; every
   ``checkpoint_every`` steps, at the end, on SIGTERM or a first Ctrl-C (SIGINT), and when a
   callback asks to stop: an asynchronous checkpoint. A non-finite loss, gradient or parameter stops the run with
   ``FloatingPointError`` before anything non-finite is saved; a checkpoint that cannot be
   written stops it with ``CheckpointSaveError`` (checked after every step).
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import math
import os
import signal
import threading
import time
import typing
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from seqmix import data as data_lib
from seqmix.train import callbacks as callbacks_lib
from seqmix.train import checkpoint as checkpoint_lib
from seqmix.train import config as config_lib
from seqmix.train import losses
from seqmix.train import metrics as metrics_lib
from seqmix.train import sharding as sharding_lib
from seqmix.train import steps as steps_lib
from seqmix.train import workdir as workdir_lib
from seqmix.train.checkpoint import CheckpointSaveError
from seqmix.train.restore import restore_model
from seqmix.train.steps import TrainState
from seqmix.train.workdir import ConfigMismatchError, load_config

CHECKPOINT_DIR = "checkpoints"


class NonFiniteError(FloatingPointError):
    """The loss, a gradient or a parameter became NaN or Inf at ``step``."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


class _StopFlag:
    """Set by SIGTERM or a first SIGINT (Ctrl-C): the handler only records it, the loop saves
    and returns. A second SIGINT interrupts at once (KeyboardInterrupt). Installed in the
    main thread only."""

    NAMES: typing.ClassVar[dict] = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "SIGINT"}

    def __init__(self):
        self.signal: str | None = None
        self._previous: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in self.NAMES:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame):
        del frame
        self.signal = self.signal or self.NAMES[signum]
        if signum == signal.SIGINT:  # the next Ctrl-C is not caught
            signal.signal(signal.SIGINT, signal.default_int_handler)

    def __exit__(self, *exc):
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        return False


def _evaluate(eval_step, state, rngs, eval_set, task) -> dict:
    totals = None
    for batch in eval_set:
        sums = eval_step(state.params, rngs, state.other, batch)
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    totals = jax.device_get(totals)
    return losses.finish(totals, bits_per_byte=task.bits_per_byte)


def _log_parameters(program, log) -> None:
    from seqmix.models import layer_names

    names = layer_names(program.model_config)
    rows = steps_lib.params_by_layer(program.parts, names)
    log(f"parameters: {program.num_params:,} in total")
    for group, n in rows:
        indent = "    " if group.startswith("layer ") and group.count(" ") > 2 else "  "
        log(f"{indent}{group:<32s} {n:>12,}")


def train_and_evaluate(
    config,
    workdir: str,
    *,
    callbacks: Sequence[Callable | callbacks_lib.Callback] = (),
    on_config_change: str = "refuse",
    label: str | None = None,
    program_builder: Callable[..., steps_lib.Program] | None = None,
) -> dict:
    """Trains ``config`` in ``workdir`` (resuming from its checkpoints) and evaluates.

    Args:
      config: an experiment config (``seqmix.train.config``).
      workdir: the run directory (created if needed; ``~`` expanded).
      callbacks: ``seqmix.train.callbacks.Callback`` objects, or functions
        ``fn(step, train metrics)``; any of them may ask the loop to stop.
      on_config_change: what to do when ``workdir`` holds a run whose identity (seed,
        model, data, optimizer, batch size, compute dtype) differs from ``config``'s:
        ``"refuse"`` (ConfigMismatchError naming the keys; nothing on disk changes),
        ``"fine_tune"`` (train ``train.num_steps`` more steps from the newest checkpoint's
        parameters, with a fresh optimizer and schedule) or ``"fresh"`` (move the recorded
        run to ``workdir/previous/<k>/`` and start at step 0). Ignored when the identity is
        the same: the run resumes.
      label: a prefix for this run's progress and log lines (several runs in one process).
      program_builder: ``fn(config, *, mesh, step_offset) -> Program`` for another
        objective in this loop (default ``seqmix.train.build_program``; distillation:
        ``seqmix.train.distill.program_builder(teacher, student)``).

    Returns:
      ``{"step", "eval" (the last evaluation's metrics), "stopped_by" (None, "SIGTERM",
      "SIGINT" (a first Ctrl-C; a second one interrupts at once) or a callback's reason), "workdir", "metric", "event" ("new", "resume", "fine_tune" or
      "fresh")}``.

    Raises:
      ValueError for a bad config (before compiling), ConfigMismatchError (a ValueError)
      for a config that differs from the workdir's, NonFiniteError (a FloatingPointError)
      when the loss, gradients or parameters become non-finite, CheckpointSaveError when a
      checkpoint cannot be written.
    """
    t_start = time.time()
    if program_builder is None and "distill" in config:
        raise ValueError(
            "config has a distill section: distillation runs start with "
            "python -m seqmix.experiments.distill (or train_and_evaluate with "
            "program_builder=seqmix.train.distill.program_builder(...))"
        )
    build_program = program_builder or steps_lib.build_program
    prefix = f"[{label}] " if label else ""
    log = lambda msg, *args: logging.info(prefix + msg, *args)
    task = data_lib.make_task(config)
    mesh = sharding_lib.make_mesh(config.mesh)
    config_lib.validate(config, task=task, num_devices=len(jax.devices()))
    num_steps = int(config.train.num_steps)
    workdir = os.path.abspath(os.path.expanduser(workdir))
    # Raises before anything is written when the workdir holds another run.
    plan = workdir_lib.plan_start(config, workdir, on_config_change)
    offset = plan.segment_start if plan.event == "resume" else 0
    program = build_program(config, mesh=mesh, step_offset=offset)
    if plan.event == "fine_tune" and not workdir_lib.checkpoint_steps(workdir):
        raise ValueError(
            f"on_config_change='fine_tune': {workdir} has no checkpoint to start from "
            f"(its config differs in {workdir_lib.describe(plan.identity_changes)}); use "
            "'fresh' to start over there"
        )
    if plan.event == "fresh":
        workdir_lib.record_start(plan, config, step=0, segment_start=0)
    train_cfg = config.train
    on_host = bool(train_cfg.get("init_on_host", True))
    abstract = program.abstract_state
    checkpoints = checkpoint_lib.Checkpoints(
        os.path.join(workdir, CHECKPOINT_DIR),
        keep=int(train_cfg.keep),
        metric=task.metric,
        metric_mode=task.metric_mode,
        async_save=bool(train_cfg.get("async_checkpoints", True)),
    )
    writer = None
    prefetch = batch_prefetcher(int(train_cfg.get("data_processes", 0) or 0))
    try:
        full_targets = {
            "params": abstract.params,
            "train": {"opt_state": abstract.opt_state, "other": abstract.other},
        }
        start, state, rngs = None, None, None
        saved = checkpoints.all_steps()
        # A segment's first checkpoint holds the optimizer state of the segment before it:
        # starting a fine-tune (or resuming one that saved nothing yet) takes the model only.
        model_only = plan.event == "fine_tune" or (
            plan.event == "resume" and offset > 0 and saved and max(saved) <= offset
        )
        if plan.event in ("resume", "fine_tune") and saved:
            found, items = checkpoints.restore_latest(
                {"params": abstract.params} if model_only else full_targets,
                set_aside_corrupt=not model_only,
            )
            if found is not None:
                start = found
                if model_only:
                    offset = found
                    program = build_program(config, mesh=mesh, step_offset=offset)
                    params = items["params"]
                    other = checkpoints.restore_part(found, "train", {"other": abstract.other})
                    opt_sh = program.state_shardings.opt_state
                    opt_state = jax.jit(program.tx.init, out_shardings=opt_sh)(params)
                    state = TrainState(params, opt_state, other["other"])
                else:
                    state = TrainState(
                        items["params"], items["train"]["opt_state"], items["train"]["other"]
                    )
                rngs = steps_lib.init_rngs(program, on_host=on_host)
        last = offset + num_steps
        if start is None:
            state, rngs = steps_lib.init_state(program, on_host=on_host)
            start = 0
        if start > last:
            raise ValueError(
                f"train.num_steps={num_steps} ends at step {last}, before the step {start} of "
                f"the newest checkpoint in {checkpoints.directory}"
            )
        if plan.event != "fresh":
            workdir_lib.record_start(plan, config, step=start, segment_start=offset)
        writer = metrics_lib.MetricsWriter(workdir)
        if plan.event == "new" or start == 0:
            log("starting from scratch in %s", workdir)
        elif plan.event == "fine_tune" or model_only:
            log(
                "fine-tuning from the parameters of step %d in %s (%s)",
                start,
                checkpoints.directory,
                workdir_lib.describe(plan.identity_changes) or "same config",
            )
        else:
            log("resumed from step %d of %s", start, checkpoints.directory)
        if plan.changes and plan.event == "resume":
            log("config changes recorded in the history: %s", workdir_lib.describe(plan.changes))
        log(
            "mesh %s, steps %d..%d of %d x %d tokens",
            sharding_lib.describe(mesh),
            start + 1,
            last,
            task.batch_size,
            task.seq_len,
        )
        _log_parameters(program, log)
        eval_set = [program.put_batch(b) for b in task.eval_batches()]
        result = _run(
            program=program,
            state=state,
            rngs=rngs,
            start=start,
            last=last,
            task=task,
            train_cfg=train_cfg,
            eval_set=eval_set,
            checkpoints=checkpoints,
            writer=writer,
            prefetch=prefetch,
            callbacks=[callbacks_lib.as_callback(c) for c in callbacks],
            label=label or "",
            log=log,
        )
    finally:
        prefetch.shutdown(wait=False, cancel_futures=True)
        checkpoints.close()
        if writer is not None:
            writer.close()
    log("finished at step %d in %.1f s", result["step"], time.time() - t_start)
    return dict(result, workdir=workdir, metric=task.metric, event=plan.event)


def batch_prefetcher(processes: int) -> concurrent.futures.Executor:
    """Makes the training batches ahead of the step: in one thread (``processes`` 0) or in
    ``processes`` spawned processes, fresh interpreters (no fork of a process that runs
    JAX's threads) that make the next ``processes`` batches while the step runs. Processes
    keep the batches of jobs that share one process (the recall sweep's threads) from
    contending for the interpreter lock; a task's ``batch`` is picklable for them."""
    if processes <= 0:
        return concurrent.futures.ThreadPoolExecutor(max_workers=1)
    import multiprocessing

    return concurrent.futures.ProcessPoolExecutor(
        max_workers=processes,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_batch_worker_init,
    )


def _batch_worker_init() -> None:
    """A batch process makes numpy arrays: should anything in it start JAX, it gets the
    CPU, never a share of the accelerator's memory. It ignores SIGINT, which a terminal or
    a time limit sends to the whole process group: the training process decides what an
    interrupt does (evaluate, save, stop), and a batch process that died of it would break
    the pool under the step that waits for its batch."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    jax.config.update("jax_platforms", "cpu")


def _run(
    *,
    program,
    state,
    rngs,
    start,
    last,
    task,
    train_cfg,
    eval_set,
    checkpoints,
    writer,
    prefetch,
    callbacks,
    label,
    log,
) -> dict:
    train_step = program.train_step
    depth = max(1, int(train_cfg.get("data_processes", 0) or 0))  # batches made ahead
    eval_every = int(train_cfg.eval_every)
    checkpoint_every = int(train_cfg.checkpoint_every)
    log_every = int(train_cfg.log_every)
    progress = metrics_lib.ProgressBar(last, start, every=log_every, label=label)
    last_saved = start if start > 0 else None
    last_eval: dict | None = None
    last_eval_step: int | None = None
    window: dict[str, float] = {}
    window_counts: dict[str, int] = {}  # steps behind each key (objectives may vary by step)
    window_steps, timed_steps, window_t0 = 0, 0, time.time()
    compile_step, compile_s = start + 1, None
    step_of_state = start
    stop_reason: str | None = None
    eval_compiled = False

    def ask(reason: str | None) -> None:
        nonlocal stop_reason
        if reason and stop_reason is None:
            stop_reason = reason

    def handle(step: int, metrics) -> None:
        nonlocal window_steps, timed_steps, window_t0, window, window_counts
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
            raise NonFiniteError(
                f"training stopped at step {step}: {what}. Nothing non-finite was saved; "
                f"{where}. Lower optimizer.lr, raise optimizer.warmup_steps or set "
                f"optimizer.clip_norm, then rerun to resume from that checkpoint.",
                step,
            )
        scalars = {k: float(v) for k, v in metrics.items() if k != "params_finite"}
        for cb in callbacks:
            ask(cb.on_train(step, scalars))
        for k, v in scalars.items():
            window[k] = window.get(k, 0.0) + v
            window_counts[k] = window_counts.get(k, 0) + 1
        window_steps += 1
        if step != compile_step:
            timed_steps += 1
        now = time.time()
        elapsed = max(now - window_t0, 1e-9)
        tok_s = timed_steps * task.tokens_per_batch / elapsed if timed_steps else None
        ms = 1e3 * elapsed / timed_steps if timed_steps else None
        shown = {"loss": window["loss"] / window_counts["loss"]}
        if "accuracy" in window:
            shown["acc"] = window["accuracy"] / window_counts["accuracy"]
        progress.update(step, shown, tok_s, ms)
        if step % log_every == 0 or step == last:
            means = {k: v / window_counts[k] for k, v in window.items()}
            if tok_s is not None:
                means["tokens_per_second"] = tok_s
                means["ms_per_step"] = ms
            if step - window_steps < compile_step <= step and compile_s is not None:
                means["compile_seconds"] = compile_s  # this window's first step compiled
            if task.bits_per_byte:
                ce = means.get("cross_entropy")
                if ce is None and program.loss_is_cross_entropy:
                    ce = means["loss"]
                if ce is not None:
                    means["bits_per_byte"] = ce / math.log(2.0)
            writer.write(step, "train", means)
            window, window_steps, timed_steps, window_t0 = {}, 0, 0, now
            window_counts = {}

    def evaluate(step: int) -> dict:
        nonlocal eval_compiled, last_eval, last_eval_step
        t0 = time.time()
        result = _evaluate(program.eval_step_for(step), state, rngs, eval_set, task)
        if not eval_compiled:
            eval_compiled = True
            log(
                "first evaluation took %.1f s (it includes compiling the evaluation step)",
                time.time() - t0,
            )
        writer.write(step, "eval", result)
        writer.flush()
        progress.write(f"eval step {step}: " + " ".join(f"{k} {v:.4f}" for k, v in result.items()))
        last_eval, last_eval_step = result, step
        for cb in callbacks:
            ask(cb.on_eval(step, result))
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
        progress.write(f"checkpoint step {step}")

    stopped_by = None
    with _StopFlag() as stop:
        pending = None
        # the batches of the next steps, made ahead (one per prefetch worker)
        ahead = collections.deque()
        queued = start

        def queue_batches():
            nonlocal queued
            while len(ahead) < depth and queued < last:
                queued += 1
                ahead.append(prefetch.submit(task.train_batch, queued))

        queue_batches()
        if start < last:
            log("step %d compiles the training step; its time is not in tok/s, ms/step", start + 1)
        for step in range(start + 1, last + 1):
            host_batch = ahead.popleft().result()
            queue_batches()
            state, metrics = train_step(state, rngs, program.put_batch(host_batch), np.int32(step))
            step_of_state = step
            if step == compile_step:
                jax.block_until_ready(metrics)
                compile_s = time.time() - window_t0
                window_t0 = time.time()
                log("step %d (compile and run) took %.1f s", step, compile_s)
            checkpoints.check()
            if pending is not None:
                handle(*pending)
            pending = (step, metrics)
            periodic_eval = step == last or bool(eval_every and step % eval_every == 0)
            periodic_save = step == last or bool(checkpoint_every and step % checkpoint_every == 0)
            if periodic_eval or periodic_save or stop.signal or stop_reason:
                handle(*pending)
                pending = None
                t_pause = time.time()
                eval_metrics = None
                if periodic_eval or stop_reason:  # a callback's stop is evaluated; SIGTERM not
                    eval_metrics = evaluate(step)
                if periodic_save or stop.signal or stop_reason:
                    save(step, eval_metrics)
                window_t0 += time.time() - t_pause  # tokens/s counts training time only
            if stop.signal is not None or stop_reason is not None:
                stopped_by = stop.signal or stop_reason
                progress.write(
                    f"stopped at step {step} ({stopped_by}): checkpoint saved in "
                    f"{checkpoints.directory}; run the same command to resume"
                )
                break
        if pending is not None:
            handle(*pending)
        if last_eval is None and stopped_by is None:  # resumed at the end: evaluate once
            evaluate(step_of_state)
        checkpoints.wait()
    writer.flush()
    return {"step": step_of_state, "eval": last_eval, "stopped_by": stopped_by}


__all__ = [
    "CheckpointSaveError",
    "ConfigMismatchError",
    "NonFiniteError",
    "TrainState",
    "load_config",
    "restore_model",
    "train_and_evaluate",
]
