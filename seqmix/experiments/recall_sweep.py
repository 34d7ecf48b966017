"""The associative-recall study: every (mixer, d_model, setting, learning rate) of configs/recall.

    seqmix-recall-sweep [--compile_workers=8] [--workers=4] [--steps=4000]
    python -m seqmix.experiments.recall_sweep ...            # the same launcher

Follows Zoology's MQAR protocol (vocabulary 8192, two layers, keys and values from the two
halves of the vocabulary, power-law query gaps, accuracy at the answer positions) with a
reduced training budget (a grid larger than one job's time limit continues with ``--resume``): ``steps``
updates of ``batch_size`` fresh sequences (4000 x 256 = 1.02M sequences against Zoology's
64 epochs of 100k, about 6x fewer), each run stopping early once its evaluation accuracy
reaches 0.99. The configs compute in bfloat16 with float32 parameters and optimizer state.

Learning rates: every job runs at each of ``--lrs`` (default ``configs/recall.LRS``), the
best per point kept; or a short pilot chooses one rate per mixer, and the grid trains only
that one (half the jobs):

    seqmix-recall-sweep --d_models=128 --settings=256:16 --lrs=1e-3,3e-3,1e-2 --steps=3000 \
        --out_dir=pilot
    seqmix-recall-sweep --lrs_from=pilot/recall.json

Each job is one (mixer, d_model, setting) at one learning rate, trained by the one training
loop (``seqmix.train.train_and_evaluate``) in its own workdir: the loop evaluates every
250 steps, and its callbacks stop it at accuracy 0.99 (``StopAtMetric``), at the deadline
(``Deadline``, ``--deadline_s``) and on an interrupt (``StopWhenSet``). Workdirs are
temporary (removed when the job's row is written) unless ``--runs_dir`` keeps them there;
a kept job's workdir resumes where it stopped when the sweep runs again, so a run cut by one
sweep's deadline continues in the next sweep on the same disk, whose deadline counts only its
remaining steps (``kept_step``).

Jobs run in ``--workers`` threads of one process: they share one device allocator and one
stream, so small models overlap their Python dispatch without the GPU time-slicing between
processes. Each concurrent job makes its MQAR batches in a process of its own
(``--data_processes``, ``train.data_processes``), so that the numpy work of one job's
batches does not hold the interpreter lock against the others' dispatch, and runs with
XLA's command buffers off (CUDA graphs that concurrent jobs broke). Compilation is the
other cost (two programs per job, tens of seconds each on the GPU, one at a time in one
process): ``--compile_workers=N`` first compiles every job in N processes into the
persistent cache (``experiments/bench/precompile.py``, at most ``--compile_budget_s``), so
that the training threads start from cache hits (the workers build the same
``seqmix.train.build_program``). Jobs are scheduled longest first and none starts after
``budget_s``. With ``--deadline_s``, a job starts only if the accelerator time still owed to
the running jobs plus its own ends before the deadline (``next_job``; a cut run's training
is lost unless ``--runs_dir`` keeps it), and a shorter one takes its place. Each row
records its ``concurrency`` (the mean number of jobs beside it) and ``step_seconds`` (its
wall seconds per step after the first), so its share of the accelerator per step is known
(``device_seconds_per_step``); the speed comes from this sweep's runs and, before it has
any, from earlier sweeps' rows on the same device; with none at all the first job starts
alone and the others wait for its first evaluation. Writes ``recall.json`` (every run, the
best rate per point, the recurrent state size of each model: the floats of its decoding
cache at the sequence length; rows of jobs still training, as ``cut``, every 30 s) and,
where matplotlib is installed, two plots to ``--out_dir`` (default
``$SEQMIX_RUNS/recall_sweep`` or ``~/seqmix-runs/recall_sweep``) and ``$OUT``. On SIGINT the running jobs evaluate, save and
stop; those that do not within 30 s (still compiling) are left behind with their last
evaluation.
"""

from __future__ import annotations

import concurrent.futures as cf
import functools
import json
import os
import signal
import threading
import time

from absl import flags

from seqmix.experiments import cli
from seqmix.experiments.bench import precompile
from seqmix.train.callbacks import Callback

_WORKERS = flags.DEFINE_integer("workers", 4, "Concurrent jobs (threads) sharing the device.")
_COMPILE_WORKERS = flags.DEFINE_integer(
    "compile_workers",
    0,
    "Processes that compile every job into the persistent cache first (0: none).",
)
_COMPILE_BUDGET = flags.DEFINE_float(
    "compile_budget_s", 240.0, "The parallel compile stops after this many seconds."
)
_COMPILE_ONLY = flags.DEFINE_string("compile_only", None, "Internal: 'i/n' shard to compile.")
_COMPILE_FIRST = flags.DEFINE_integer(
    "compile_first",
    None,
    "The compile workers prepare only the first N jobs of the queue (longest first), those "
    "that a time-limited sweep will reach; the others compile when they start (default: all).",
)
_STEPS = flags.DEFINE_integer("steps", 4000, "Training steps per run (upper bound).")
_BATCH = flags.DEFINE_integer("batch_size", 256, "Sequences per step.")
_BUDGET = flags.DEFINE_float("budget_s", 480.0, "No job starts after this many seconds.")
_MIXERS = flags.DEFINE_list("mixers", None, "Mixers (default: configs/recall.MIXERS).")
_DMODELS = flags.DEFINE_list("d_models", None, "Widths (default: configs/recall.D_MODELS).")
_SETTINGS = flags.DEFINE_list("settings", None, "seq_len:pairs items (default: all four).")
_POINTS = flags.DEFINE_list(
    "points",
    None,
    "Only the points matching one of these 'mixer:d_model:seq_len:pairs' patterns (shell "
    "wildcards), out of --mixers x --d_models x --settings: e.g. '*:*:256:16,mamba2:*:*:*'.",
)
_LRS = flags.DEFINE_list("lrs", None, "Learning rates (default: configs/recall.LRS).")
_LRS_FROM = flags.DEFINE_string(
    "lrs_from",
    None,
    "A recall.json of a pilot (an earlier sweep with several --lrs), or several separated by "
    "commas: each mixer trains at the one rate that did best there (see pilot_rates); "
    "replaces --lrs. With --merge: the grid's rate of each mixer the grid's rates lack.",
)
_OUT = flags.DEFINE_string(
    "out_dir", None, "Results folder (default $SEQMIX_RUNS/recall_sweep, ~/seqmix-runs/...)."
)
_RUNS_DIR = flags.DEFINE_string(
    "runs_dir",
    None,
    "Keep each job's workdir here (default: temporary, removed): a run cut by a deadline or "
    "an interrupt resumes from its checkpoint when a later sweep runs its job again.",
)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of models and data.")
_RESUME = flags.DEFINE_string(
    "resume",
    None,
    "A recall.json of an earlier sweep, or several separated by commas (a pilot's too): "
    "their finished runs are kept and their jobs not run again (a grid can continue "
    "across several invocations).",
)
_ATTENTION_IMPL = flags.DEFINE_string(
    "attention_implementation",
    None,
    "The attention jobs' kernel: 'auto' (the op's dispatch: cuDNN on a GPU) or an "
    "implementation name. Default: 'auto', except 'pallas_triton' on a GPU with --workers > 1 "
    "(loading a cuDNN attention program captures a CUDA graph, which concurrent jobs' launches "
    "break: 'capturing stream has unjoined work', then a crash).",
)
_DATA_PROCESSES = flags.DEFINE_integer(
    "data_processes",
    None,
    "Processes per job that make its MQAR batches (train.data_processes). Default: 1 with "
    "--workers > 1 (jobs are threads of one process and would share the interpreter lock "
    "with their batches), else 0 (a thread).",
)
_TABLE_FROM = flags.DEFINE_string(
    "table_from",
    None,
    "Print the grid of this recall.json as a markdown table (accuracy and steps per mixer, "
    "setting and width) and exit.",
)
_MERGE = flags.DEFINE_string(
    "merge",
    None,
    "Write one recall.json (and its plots) to --out_dir from several sweeps' recall.json "
    "files, comma-separated, and exit: every finished run once, 'skipped' the study's points "
    "(--points, default configs/recall.STUDY_POINTS) still without one; --lrs_from adds the "
    "rates of mixers swept after the grid's pilot.",
)
_DEADLINE = flags.DEFINE_float(
    "deadline_s",
    None,
    "Runs still training this many seconds after the start evaluate, save and stop (marked 'cut').",
)


# Set on SIGINT (the stage's time limit): running jobs evaluate at once and return, cut.
_STOP = threading.Event()
# job -> the row of its latest evaluation (cut), written with the results while it trains
_PROGRESS: dict[tuple, dict] = {}
_EVAL_EVERY = 250
TARGET_ACCURACY = 0.99
# --attention_implementation as main resolved it (None: the op's dispatch)
_ATTENTION = {"implementation": None}
# --data_processes as main resolved it
_DATA = {"processes": 0}
# next_job's answer when a job should wait for the running jobs' first evaluations
WAIT = -1


class Occupancy:
    """The number of jobs running, integrated over time. ``enter()`` (a job starts) returns
    a reading ``(time, area)``; ``mean_since(reading)`` is the mean number of jobs that ran
    from then to now, the reader included: a run's concurrency."""

    def __init__(self):
        self._lock = threading.Lock()
        self._count = 0
        self._area = 0.0
        self._since = time.time()

    def _reading(self) -> tuple[float, float]:  # under the lock
        now = time.time()
        self._area += self._count * (now - self._since)
        self._since = now
        return now, self._area

    def enter(self) -> tuple[float, float]:
        with self._lock:
            reading = self._reading()
            self._count += 1
            return reading

    def leave(self) -> None:
        with self._lock:
            self._reading()
            self._count -= 1

    def mean_since(self, reading: tuple[float, float]) -> float:
        with self._lock:
            now, area = self._reading()
        t0, area0 = reading
        return (area - area0) / (now - t0) if now > t0 else float(max(self._count, 1))


_OCCUPANCY = Occupancy()


def data_processes(flag: int | None, workers: int) -> int:
    """Batch processes per job: the flag, or 1 when jobs run concurrently, else 0."""
    if flag is None:
        return 1 if workers > 1 else 0
    return flag


# XLA's CUDA-graph command buffers, off while jobs share the GPU: a job's graph update
# failed under concurrent jobs ("CUDA_ERROR_GRAPH_EXEC_UPDATE_FAILURE" in jit_train_step)
NO_COMMAND_BUFFERS = "--xla_gpu_enable_command_buffer="


def concurrent_xla_flags(xla_flags: str, workers: int) -> str:
    """``XLA_FLAGS`` for a sweep of ``workers`` concurrent jobs: with more than one, XLA's
    command buffers (CUDA graphs) off, unless the flags already set them; the compile
    workers inherit the result, so their programs are the jobs' cache hits."""
    if workers <= 1 or "xla_gpu_enable_command_buffer" in xla_flags:
        return xla_flags
    return f"{xla_flags} {NO_COMMAND_BUFFERS}".strip()


def attention_implementation(flag: str | None, workers: int, backend: str) -> str | None:
    """The implementation the jobs' attention asks for (None: the op's own dispatch)."""
    if flag is None:
        return "pallas_triton" if backend == "gpu" and workers > 1 else None
    return None if flag == "auto" else flag


def job_config(mixer, d_model, seq_len, pairs, lr, steps, batch_size, seed):
    """The training config of one job: ``configs/recall.py`` at this point and rate, with
    the sweep's evaluation cadence (every 250 steps) and a checkpoint only at the end."""
    from seqmix.configs import recall

    config = recall.get_config(
        f"mixer={mixer},d_model={d_model},seq_len={seq_len},num_kv_pairs={pairs},"
        f"steps={steps},batch_size={batch_size},lr={lr}"
    )
    config.seed = seed
    if _ATTENTION["implementation"] is not None:
        config.model.implementation = {"attention": _ATTENTION["implementation"]}
    config.train.eval_every = min(_EVAL_EVERY, steps)
    config.train.log_every = min(_EVAL_EVERY, steps)
    config.train.checkpoint_every = 0
    config.train.keep = 1
    config.train.data_processes = _DATA["processes"]
    return config


def model_signature(config) -> str:
    """12 hex digits of what a run trains: the model config as the loop builds it (compute
    dtype included) with only the mixers its layers use, without the kernel choice
    (``implementation``). Rows carry it as ``model``; ``resume`` and ``pilot_rates`` use a
    row only where it matches the current config of its point, so a change to
    ``configs/recall.py`` retires the rows trained before it."""
    import hashlib

    from seqmix.train import model_config_of

    model = model_config_of(config).to_dict()
    model.pop("implementation", None)
    model.pop("legend", None)
    model["mixers"] = {k: v for k, v in model["mixers"].items() if k in set(model["layers"])}
    text = json.dumps(model, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


@functools.cache
def point_signature(mixer: str, d_model: int, seq_len: int, pairs: int) -> str:
    """``model_signature`` of a grid point under the current ``configs/recall.py``."""
    from seqmix.configs import recall

    return model_signature(
        recall.get_config(f"mixer={mixer},d_model={d_model},seq_len={seq_len},num_kv_pairs={pairs}")
    )


def current(r: dict) -> bool:
    """Whether row ``r`` was trained with its point's current model config."""
    keys = ("mixer", "d_model", "seq_len", "num_kv_pairs")
    return all(k in r for k in keys) and r.get("model") == point_signature(*(r[k] for k in keys))


def sizes(config) -> dict:
    """``{"state_size", "params"}``: the floats of one layer's decoding cache at the
    sequence length, and the parameter count (shapes only: nothing is allocated)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from seqmix import models
    from seqmix.train import model_config_of, split_model

    model_config = model_config_of(config)
    model = nnx.eval_shape(lambda: models.build_model(model_config, rngs=nnx.Rngs(0)))
    cache = jax.eval_shape(lambda: model.init_cache(1, int(config.data.seq_len)))
    floats = sum(x.size for x in jax.tree.leaves(cache) if jnp.issubdtype(x.dtype, jnp.floating))
    parts = split_model(model_config, int(config.seed))
    return {
        "state_size": int(floats // len(models.layer_names(model_config))),
        "params": int(sum(x.size for x in jax.tree.leaves(parts.params))),
    }


def compile_programs(config) -> tuple:
    """The compiled ``(train_step, eval_step)`` of a job's config, lowered from abstract
    arguments: what the loop of the same config runs (a persistent-cache hit for it)."""
    from seqmix import data
    from seqmix.train import build_program

    task = data.make_task(config)
    program = build_program(config)
    args = program.abstract_args(task.train_batch(1), task.eval_batches()[0])
    return (
        program.train_step.lower(*args["train"]).compile(),
        program.eval_step.lower(*args["eval"]).compile(),
    )


class _Progress(Callback):
    """Keeps a job's latest evaluation in ``_PROGRESS`` (written as a cut row while the job
    trains) and prints a line per evaluation."""

    def __init__(self, job, row, reading):
        self.job, self.row, self.reading = job, row, reading
        self.start_step = None  # the step this run resumed from (0: a fresh start)
        self.first = None  # (step, time) when the first step (which compiles) ended

    def on_train(self, step, metrics):
        if self.start_step is None:
            self.start_step = step - 1
            self.first = (step, time.time())
        return None

    def timing(self, step: int) -> dict:
        """``start_step``, ``concurrency`` and ``step_seconds`` (wall seconds per step after
        the first, which compiled or loaded the programs; None before a second step) of the
        run at ``step``."""
        timing = dict(
            start_step=self.start_step if self.start_step is not None else step,
            concurrency=round(_OCCUPANCY.mean_since(self.reading), 3),
        )
        if self.first is not None and step > self.first[0]:
            timing["step_seconds"] = (time.time() - self.first[1]) / (step - self.first[0])
        return timing

    def on_eval(self, step, metrics):
        seconds = time.time() - self.reading[0]
        _PROGRESS[self.job] = dict(
            self.row,
            accuracy=metrics["accuracy"],
            eval_loss=metrics["loss"],
            steps=step,
            cut=True,
            seconds=seconds,
            **self.timing(step),
        )
        print(f"{self.job} step {step} accuracy {metrics['accuracy']:.3f} after {seconds:.0f}s")
        return None


def workdir_name(job: tuple) -> str:
    """The workdir of job ``(mixer, d_model, seq_len, pairs, lr)`` under ``--runs_dir``."""
    mixer, d_model, seq_len, pairs, lr = job
    return f"{mixer}-d{d_model}-T{seq_len}-p{pairs}-lr{lr:g}"


def kept_step(runs_dir: str | None, job: tuple) -> int:
    """The step of the newest checkpoint in the kept workdir of ``job`` (0: none): where a
    run cut by an earlier sweep's deadline resumes."""
    if not runs_dir:
        return 0
    path = os.path.join(runs_dir, workdir_name(job), "checkpoints")
    steps = [int(n) for n in os.listdir(path) if n.isdigit()] if os.path.isdir(path) else []
    return max(steps, default=0)


def run_job(
    mixer,
    d_model,
    seq_len,
    pairs,
    lr,
    steps,
    batch_size,
    seed,
    deadline=None,
    runs_dir=None,
) -> dict:
    """Trains one grid point at one learning rate with the training loop and returns its
    row: accuracy and evaluation loss at the step it stopped (accuracy >= 0.99, the last
    step, the ``deadline`` (a ``time.time()`` value) or an interrupt (``_STOP``); the last
    two mark a run below 0.99 ``cut``), or NaN at the step where the loss stopped being
    finite. The workdir is ``runs_dir/<job>`` (kept, resumable) or a temporary one. The row's
    ``concurrency`` is the mean number of jobs that ran during it, itself included, and its
    ``step_seconds`` the wall seconds per step after the first (which compiled or loaded the
    programs), so that ``step_seconds / concurrency`` is its share of the device per step
    (``device_seconds_per_step``); ``start_step`` is the step it resumed from."""
    job = (mixer, d_model, seq_len, pairs, lr)
    reading = _OCCUPANCY.enter()
    try:
        return _run_job(job, reading, steps, batch_size, seed, deadline, runs_dir)
    finally:
        _OCCUPANCY.leave()


def _run_job(job, reading, steps, batch_size, seed, deadline, runs_dir) -> dict:
    import shutil
    import tempfile

    import jax

    from seqmix.train import (
        Deadline,
        NonFiniteError,
        StopAtMetric,
        StopWhenSet,
        train_and_evaluate,
    )

    mixer, d_model, seq_len, pairs, lr = job
    t0 = reading[0]
    config = job_config(mixer, d_model, seq_len, pairs, lr, steps, batch_size, seed)
    row = dict(
        mixer=mixer,
        d_model=d_model,
        seq_len=seq_len,
        num_kv_pairs=pairs,
        lr=lr,
        compute_dtype=config.train.compute_dtype,
        model=model_signature(config),
        # rows of several sweeps share a results file: each says where it ran, and its budget
        device=jax.devices()[0].device_kind,
        max_steps=steps,
        **sizes(config),
    )
    if _ATTENTION["implementation"] is not None:
        row["attention_implementation"] = _ATTENTION["implementation"]
    progress = _Progress(job, row, reading)
    callbacks = [StopAtMetric("accuracy", TARGET_ACCURACY), StopWhenSet(_STOP), progress]
    if deadline is not None:
        callbacks.append(Deadline(deadline))
    name = workdir_name(job)
    workdir = os.path.join(runs_dir, name) if runs_dir else tempfile.mkdtemp(prefix="recall_")
    try:
        result = train_and_evaluate(config, workdir, callbacks=callbacks, label=name)
    except NonFiniteError as e:
        return dict(
            row,
            accuracy=float("nan"),
            eval_loss=float("nan"),
            steps=e.step,
            cut=False,
            seconds=time.time() - t0,
            **progress.timing(e.step),
        )
    finally:
        _PROGRESS.pop(job, None)
        if not runs_dir:
            shutil.rmtree(workdir, ignore_errors=True)
    accuracy = float(result["eval"]["accuracy"])
    stopped = result["stopped_by"]
    return dict(
        row,
        accuracy=accuracy,
        eval_loss=float(result["eval"]["loss"]),
        steps=int(result["step"]),
        cut=bool(stopped) and accuracy < TARGET_ACCURACY,
        seconds=time.time() - t0,
        # a run resumed from a kept workdir trained steps - start_step steps in seconds
        **progress.timing(int(result["step"])),
    )


def probe_programs(mixer, d_model, seq_len, pairs, lrs, steps, batch_size, seed, vmap=True):
    """The programs of one grid point for profiling (``device/recall_probe.py``), built
    from the loop's public pieces: a dict with ``task``, the jitted ``train``/``eval``
    steps, ``init`` (the concrete state, built on the host and copied over), ``abstract``
    (their arguments' shapes) and the sizes. With ``vmap`` every rate of ``lrs`` trains at
    once: the rate lives in the optimizer state (``optax.inject_hyperparams``) and the step
    is vmapped over a leading rate axis of the state (the batch is shared); without it
    ``lrs`` holds one rate and the step is the loop's own."""
    import jax
    import jax.numpy as jnp
    import optax

    from seqmix import data
    from seqmix.train import make_eval_step, make_train_step, optimizer, split_model
    from seqmix.train import steps as steps_lib

    n = len(lrs)
    if not vmap and n != 1:
        raise ValueError(f"without the rate vmap a job trains one rate, got lrs={lrs}")
    config = job_config(mixer, d_model, seq_len, pairs, lrs[0], steps, batch_size, seed)
    task = data.make_task(config)
    model_config = steps_lib.model_config_of(config)
    parts = split_model(model_config, seed)
    unit = config.optimizer.copy_and_resolve_references()
    unit.lr = 1.0  # the schedule's shape; the rate itself is a traced hyperparameter
    tx = optax.chain(
        optimizer.make_optimizer(unit, steps), optax.inject_hyperparams(optax.scale)(step_size=1.0)
    )
    schedule = optimizer.learning_rate_schedule(unit, steps)

    def init():
        params, rngs, other = steps_lib.init_model_state(model_config, seed, None, on_host=False)
        opt_state = tx.init(params)
        state = steps_lib.TrainState(params, opt_state, other)
        if vmap:
            state = jax.tree.map(lambda x: jnp.broadcast_to(x, (n, *x.shape)), state)
        rate = jnp.asarray(lrs if vmap else lrs[0], jnp.float32)
        state = state._replace(
            opt_state=(
                state.opt_state[0],
                state.opt_state[1]._replace(hyperparams={"step_size": rate}),
            )
        )
        return state, rngs

    def host_init():
        with jax.default_device(jax.devices("cpu")[0]):
            made = init()
        return jax.device_put(made, jax.devices()[0])

    train_step = make_train_step(parts, tx, schedule, "causal_lm", seed)
    eval_step = make_eval_step(parts, "causal_lm", seed)
    if vmap:
        train_step = jax.vmap(train_step, in_axes=(0, None, None, None))
        eval_step = jax.vmap(eval_step, in_axes=(0, None, 0, None))
    spec = lambda b: {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in b.items()}
    state, rngs = jax.eval_shape(init)
    abstract = dict(
        train=(state, rngs, spec(task.train_batch(0)), jax.ShapeDtypeStruct((), jnp.int32)),
        eval=(state.params, rngs, state.other, spec(task.eval_batches()[0])),
    )
    return dict(
        task=task,
        train=jax.jit(train_step, donate_argnums=0),
        eval=jax.jit(eval_step),
        init=host_init,
        abstract=abstract,
        **sizes(config),
    )


def compile_job(b: dict) -> tuple:
    """The compiled ``(train, eval)`` steps of ``probe_programs``, lowered from the
    abstract arguments."""
    return (
        b["train"].lower(*b["abstract"]["train"]).compile(),
        b["eval"].lower(*b["abstract"]["eval"]).compile(),
    )


def _compile_shard(spec: str, jobs: list[tuple]) -> None:
    precompile.setup_cache()
    for job in precompile.shard(jobs, spec):
        t0 = time.time()
        try:
            compile_programs(job_config(*job, _STEPS.value, _BATCH.value, _SEED.value))
            print(f"compiled {job} in {time.time() - t0:.0f}s", flush=True)
        except Exception as e:  # noqa: BLE001 - the driver compiles it again and reports
            print(f"compile {job} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)


def plot(best: list[dict], path_prefix: str) -> None:
    """Accuracy against d_model and against the recurrent state size, a panel per setting,
    one colour per mixer in every panel; a run cut before its step budget (time limit) is a
    hollow marker."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    settings = sorted({(r["seq_len"], r["num_kv_pairs"]) for r in best})
    mixers = sorted({r["mixer"] for r in best})
    colors = {m: f"C{i % 10}" for i, m in enumerate(mixers)}
    handles = [Line2D([], [], color=colors[m], marker="o", label=m) for m in mixers]
    for key, xlabel, scale, suffix in (
        ("d_model", "d_model", dict(base=2), "_vs_dmodel.png"),
        ("state_size", "state size per layer (floats)", {}, "_vs_state.png"),
    ):
        fig, axes = plt.subplots(1, len(settings), figsize=(4 * len(settings), 3.4), squeeze=False)
        for ax, (T, n) in zip(axes[0], settings):
            for m in mixers:
                rows = sorted(
                    (
                        r
                        for r in best
                        if r["mixer"] == m and (r["seq_len"], r["num_kv_pairs"]) == (T, n)
                    ),
                    key=lambda r: r[key],
                )
                if not rows:
                    continue
                color = colors[m]
                ax.plot([r[key] for r in rows], [r["accuracy"] for r in rows], color=color)
                for r in rows:
                    ax.plot(
                        r[key],
                        r["accuracy"],
                        marker="o",
                        color=color,
                        markerfacecolor="white" if r.get("cut") else color,
                    )
            ax.set_xscale("log", **scale)
            ax.set_ylim(0, 1.02)
            ax.set_title(f"T={T}, {n} pairs")
            ax.set_xlabel(xlabel)
        axes[0][0].set_ylabel("MQAR accuracy")
        # beside the last panel, where it hides no point
        axes[0][-1].legend(
            handles=handles,
            fontsize=7,
            title="hollow: cut",
            title_fontsize=7,
            loc="center left",
            bbox_to_anchor=(1.02, 0.5),
        )
        fig.tight_layout()
        fig.savefig(path_prefix + suffix, dpi=110)
        plt.close(fig)


def grid_table(best: list[dict], lrs=None, steps: int | None = None) -> str:
    """The grid as markdown: a row per (setting, mixer), a column per d_model, each cell the
    best run's accuracy with its steps (``cut at`` for a run stopped by a time limit), and
    its rate where ``lrs`` (the grid's ``mixer -> rate``) names another, its step budget
    (``max_steps``) where it is not ``steps``."""
    widths = sorted({r["d_model"] for r in best})
    cells = {}
    for r in best:
        notes = [f"cut at {r['steps']}" if r.get("cut") else str(r["steps"])]
        if isinstance(lrs, dict) and r["mixer"] in lrs and r["lr"] != lrs[r["mixer"]]:
            notes.append(f"lr {r['lr']:g}")
        if r.get("max_steps") not in (None, steps):
            notes.append(f"budget {r['max_steps']}")
        steps_note = "; ".join(notes)
        key = (r["seq_len"], r["num_kv_pairs"], r["mixer"])
        cells.setdefault(key, {})[r["d_model"]] = f"{r['accuracy']:.3f} ({steps_note})"
    lines = [
        "| setting | mixer | " + " | ".join(f"d_model {d}" for d in widths) + " |",
        "|" + " --- |" * (2 + len(widths)),
    ]
    for (T, n, mixer), row in sorted(cells.items()):
        lines.append(
            f"| ({T}, {n}) | {mixer} | " + " | ".join(row.get(d, "–") for d in widths) + " |"
        )
    return "\n".join(lines)


def out_dir() -> str:
    from seqmix.configs.loader import runs_root

    return _OUT.value or os.path.join(runs_root(), "recall_sweep")


def best_runs(rows: list[dict]) -> list[dict]:
    """The best run of each point (``run_score``; at equal accuracy a finished run before
    one cut short), by setting, mixer and width."""

    def score(r):
        acc, loss = run_score(r)
        return acc, not r.get("cut"), loss

    best = {}
    for r in rows:
        if "error" in r:
            continue
        key = (r["mixer"], r["d_model"], r["seq_len"], r["num_kv_pairs"])
        if key not in best or score(r) > score(best[key]):
            best[key] = r
    return sorted(best.values(), key=lambda r: (r["seq_len"], r["mixer"], r["d_model"]))


def _skipped_rows(skipped) -> list[dict]:
    return [
        dict(zip(("mixer", "d_model", "seq_len", "num_kv_pairs"), job), lr=lr)
        for job, lr in dict.fromkeys(skipped)
    ]


def _write(rows, skipped, lrs, start, plots=True) -> list[dict]:
    """recall.json (every run, the best rate per point, the jobs not run) and the plots."""
    from seqmix.experiments.bench import common

    best_rows = best_runs(rows)
    payload = dict(
        env=common.environment(),
        steps=_STEPS.value,
        batch_size=_BATCH.value,
        lrs=lrs,
        seconds=time.time() - start,
        runs=rows,
        best=best_rows,
        skipped=_skipped_rows(skipped),
    )
    _save(payload, plots)
    return best_rows


def _save(payload: dict, plots: bool) -> None:
    """``payload`` as recall.json, with its plots, in ``out_dir()`` and ``$OUT``."""
    for d in filter(None, [out_dir(), os.environ.get("OUT")]):
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "recall.json"), "w") as f:
            json.dump(payload, f, indent=1, default=float)
        if plots and payload["best"]:
            try:
                plot(payload["best"], os.path.join(d, "recall"))
            except ImportError:
                print("matplotlib is not installed: no plots (pip install 'seqmix[bench]')")


def merge(paths: str, points=None, pilots: str | None = None) -> dict:
    """One recall.json of several sweeps' files (comma-separated): every finished run once
    (from the first file that has it, unless that run missed the target and a later one met
    it or had a larger budget) and the other runs of points without a finished run at
    their rate (``resume``), ``env`` of the newest file (by ``env.date``; each row names its
    device), ``steps``, ``batch_size`` and ``lrs`` of the newest file that names one rate per
    mixer (the grid's; a sweep over a list of rates is a side study), and in ``skipped`` the ``points``
    (patterns; default ``configs/recall.STUDY_POINTS`` over the study's grid) without any
    finished run, at the newest file's rate of their mixer where it has one.

    ``pilots`` (a pilot's recall.json, or several, comma-separated): the grid's rate of each
    mixer that the pilot ran and the grid's ``lrs`` lacks (a mixer added to the study later,
    whose points were swept at its own pilot's rate), chosen as ``--lrs_from`` chooses it
    (``pilot_rates``)."""
    from seqmix.configs import recall

    payloads = []
    for one in paths.split(","):
        with open(one) as f:
            payloads.append(json.load(f))

    def date(p):
        return p.get("env", {}).get("date", "")

    newest = max(payloads, key=date)
    grids = [p for p in payloads if isinstance(p.get("lrs"), dict)]
    grid_file = max(grids, key=date) if grids else newest
    rows, _ = resume(paths, [], [])
    finished = {
        (r["mixer"], r["d_model"], r["seq_len"], r["num_kv_pairs"])
        for r in rows
        if not r.get("cut")
    }
    grid = [
        (m, d, T, n) for (T, n) in recall.SETTINGS for d in recall.D_MODELS for m in recall.MIXERS
    ]
    wanted = [j for j in grid if matches(j, list(points or recall.STUDY_POINTS))]
    lrs = grid_file.get("lrs")
    if pilots:
        known = lrs if isinstance(lrs, dict) else {}
        piloted = set()
        for one in pilots.split(","):
            with open(one) as f:
                piloted |= {r.get("mixer") for r in json.load(f)["runs"]}
        missing = [m for m in recall.MIXERS if m in piloted and m not in known]
        lrs = {**known, **pilot_rates(pilots, missing)}
    rate = (lambda m: lrs.get(m)) if isinstance(lrs, dict) else (lambda m: None)
    return dict(
        env=newest.get("env", {}),
        steps=grid_file.get("steps"),
        batch_size=grid_file.get("batch_size"),
        lrs=lrs,
        runs=rows,
        best=best_runs(rows),
        skipped=_skipped_rows([(j, rate(j[0])) for j in wanted if j not in finished]),
        note=f"Runs of {len(payloads)} results files merged; each row names its device. "
        "skipped: the study's points without a finished run.",
    )


def resume(
    path: str, jobs: list[tuple], lrs, steps: int | None = None
) -> tuple[list[dict], list[tuple[tuple, float]]]:
    """What an earlier recall.json, or several separated by commas, keeps: ``(rows, left)``.

    ``rows``: every finished run (no error, not cut, trained with the point's current model
    config: ``current``), of this sweep's grid or not, so that its recall.json holds
    the whole study so far; and the other runs (cut, or short: see below) of points this
    sweep does not train. With ``steps``, a run below the target accuracy counts as finished
    only if its budget ``max_steps`` (else its file's ``steps``) was at least ``steps``: a
    larger budget trains it again. A run found in two files counts once, from the first,
    unless a later one had a larger budget and the first missed the target.
    ``left``: the entries ``(job, lr)`` of ``jobs`` x rates that still lack a finished run;
    ``lrs`` is a list of rates for every job or a dict ``mixer -> rate``."""
    earlier = []
    for one in path.split(","):
        with open(one) as f:
            payload = json.load(f)
        earlier += [
            dict(r, max_steps=r.get("max_steps", payload.get("steps"))) for r in payload["runs"]
        ]

    def done(r):
        if r.get("cut"):
            return False
        if steps is None or r.get("accuracy", 0.0) >= TARGET_ACCURACY:
            return True
        return r["max_steps"] is not None and r["max_steps"] >= steps

    def key(r):
        return (r["mixer"], r["d_model"], r["seq_len"], r["num_kv_pairs"], r["lr"])

    def better(r, kept):  # a run that met the target, or a larger budget, supersedes a miss
        if kept.get("accuracy", 0.0) >= TARGET_ACCURACY:
            return False
        met = r.get("accuracy", 0.0) >= TARGET_ACCURACY
        return met or (r["max_steps"] or 0) > (kept["max_steps"] or 0)

    usable = [r for r in earlier if "error" not in r and current(r)]
    finished = {}
    for r in usable:
        if done(r) and (key(r) not in finished or better(r, finished[key(r)])):
            finished[key(r)] = r
    left = [(job, lr) for job, lr in queue_of(jobs, lrs) if (*job, lr) not in finished]
    retrained = {job for job, _ in left}
    others = {}  # cut or short runs of points this sweep does not train
    for r in usable:
        if key(r) not in finished and key(r)[:4] not in retrained:
            others.setdefault(key(r), r)
    return list(finished.values()) + list(others.values()), left


def device_seconds_per_step(r: dict) -> float:
    """Run ``r``'s share of the device per step: its wall seconds per step after its first
    (``step_seconds``; else its seconds over the steps it trained from ``start_step``, where
    a kept workdir resumed) over the mean number of jobs that ran beside it, itself included
    (``concurrency``; 1 for rows that predate it). Jobs of a sweep share one device stream,
    so these shares add up to wall time; the first step, which compiles or loads the
    programs on the host, is left out where it can be."""
    per_step = r.get("step_seconds")
    if per_step is None:
        per_step = r["seconds"] / (r["steps"] - r.get("start_step", 0))
    return per_step / r.get("concurrency", 1.0)


def expected_seconds(
    job: tuple, steps: int, observed: list[dict], priors: list[dict] = ()
) -> float | None:
    """Seconds of the device that ``job`` ``(mixer, d_model, seq_len, pairs)`` should need
    for ``steps`` steps (``device_seconds_per_step``), from the runs ``observed`` in this
    sweep (rows with ``steps`` and ``seconds``, finished or still training) and ``priors``
    (earlier sweeps' rows on this device): the mean at the job's ``d_model * seq_len``,
    preferring the same mixer, then this sweep's runs; else the nearest size's, scaled by the
    work ratio (by its square root towards smaller jobs, which launch overheads keep from
    shrinking in proportion). None when nothing was observed."""
    import math

    mixer, d_model, seq_len = job[:3]

    def usable(r):
        if "error" in r:
            return False
        if r.get("step_seconds") is not None:
            return True
        return r.get("steps", 0) - r.get("start_step", 0) > 0 and r.get("seconds", 0) > 0

    seen = [(r, False) for r in observed if usable(r)] + [(r, True) for r in priors if usable(r)]
    if not seen:
        return None
    size = d_model * seq_len

    def rank(item):
        r, prior = item
        other = r["d_model"] * r["seq_len"]
        return (abs(math.log(other / size)), r["mixer"] != mixer, prior)

    def scaled(r):  # r's device seconds per step at this job's size
        ratio = size / (r["d_model"] * r["seq_len"])
        return device_seconds_per_step(r) * (ratio if ratio >= 1 else math.sqrt(ratio))

    best = min(rank(item) for item in seen)
    like = [r for r, prior in seen if rank((r, prior)) == best]
    return steps * sum(scaled(r) for r in like) / len(like)


def next_job(
    queue,
    steps: int,
    observed: list[dict],
    deadline: float | None,
    running: list[tuple[tuple, int]] = (),
    priors: list[dict] = (),
    done: dict | None = None,
) -> int | None:
    """The index of the first ``(job, lr)`` of ``queue`` that can start now; None when
    none can finish before ``deadline`` (a ``time.time()`` value; None: the first starts);
    ``WAIT`` when the speed is unknown (nothing ``observed`` nor in ``priors``) while jobs
    run: their first evaluations tell it. ``running``: ``(job, steps done)`` of the jobs
    training. Jobs share one device stream, so a job fits when the accelerator time still
    owed to the running jobs plus its own (``expected_seconds``) ends before the deadline; a
    job that starts without any measure starts alone. ``done``: ``(job, lr) -> steps`` a
    queued job resumes from (``kept_step``)."""
    if deadline is None:
        return 0 if queue else None
    owed = 0.0
    for job, trained in running:
        est = expected_seconds(job[:4], max(steps - trained, 0), observed, priors)
        if est is None:
            return WAIT
        owed += est
    now = time.time()
    for i, (job, lr) in enumerate(queue):
        left = max(steps - (done or {}).get((job, lr), 0), 0)
        est = expected_seconds(job, left, observed, priors)
        if est is None:  # nothing measured and nothing running: it starts alone
            return i
        if now + owed + est <= deadline:
            return i
    return None


def matches(job: tuple, patterns: list[str]) -> bool:
    """Whether ``job`` ``(mixer, d_model, seq_len, pairs)`` matches one of ``patterns``
    (``mixer:d_model:seq_len:pairs``, shell wildcards)."""
    import fnmatch

    name = ":".join(map(str, job))
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def queue_of(jobs: list[tuple], lrs) -> list[tuple[tuple, float]]:
    """``(job, lr)`` per job and rate: every rate of the list ``lrs``, or the job's mixer's
    rate of the dict ``lrs``."""
    if isinstance(lrs, dict):
        return [(job, float(lrs[job[0]])) for job in jobs]
    return [(job, float(lr)) for job in jobs for lr in lrs]


def run_score(r: dict) -> tuple[float, float]:
    """How a run ranks against another of the same point: accuracy (to 3 decimals), then
    the lower evaluation loss; a diverged run (NaN) ranks last."""
    import math

    acc, loss = r["accuracy"], r.get("eval_loss", float("nan"))
    return (
        round(acc, 3) if math.isfinite(acc) else -1.0,
        -loss if math.isfinite(loss) else -math.inf,
    )


def pilot_rates(path: str, mixers: list[str]) -> dict[str, float]:
    """``mixer -> rate`` from a pilot's recall.json (or several, comma-separated): for each mixer, the rate whose runs have
    the highest mean accuracy over the pilot's points, ties (a short pilot often leaves
    every rate near 0) broken by the lower mean evaluation loss (``run_score``). Failed and
    diverged runs, and runs of an earlier model config (``current``), are left out; a cut
    run counts at its last evaluation, a run that stopped at 0.99 at that point. Raises
    ValueError naming ``--lrs_from`` when a mixer has no usable pilot run."""
    import math

    runs = []
    for one in path.split(","):  # several pilots (e.g. one per group of mixers) together
        with open(one) as f:
            runs += json.load(f)["runs"]
    rates = {}
    for mixer in mixers:
        by_rate: dict[float, list[dict]] = {}
        for r in runs:
            if (
                r.get("mixer") == mixer
                and "error" not in r
                and math.isfinite(r["accuracy"])
                and current(r)
            ):
                by_rate.setdefault(float(r["lr"]), []).append(r)
        if not by_rate:
            raise ValueError(
                f"--lrs_from={path}: no usable pilot run of mixer {mixer!r} (every run "
                "failed or diverged, was trained with an earlier model config, or there is "
                "none)"
            )

        def mean(lr):
            rs = by_rate[lr]
            return run_score(
                {k: sum(r[k] for r in rs) / len(rs) for k in ("accuracy", "eval_loss")}
            )

        rates[mixer] = max(by_rate, key=mean)
    return rates


def _setting(item: str) -> tuple[int, int]:
    """``"seq_len:pairs"`` of ``--settings`` as two ints."""
    try:
        T, n = (int(x) for x in item.split(":"))
    except ValueError:
        cli.fail(f"--settings items are seq_len:pairs (e.g. 256:16), got {item!r}")
    return T, n


def main(args: cli.Args):
    if len(args.argv) > 1 or args.overrides:
        cli.fail(f"unexpected arguments: {args.argv[1:]} {args.overrides or ''}".strip())
    if _TABLE_FROM.value:
        try:
            with open(_TABLE_FROM.value) as f:
                payload = json.load(f)
            best = payload["best"]
        except (OSError, KeyError, TypeError, json.JSONDecodeError) as e:
            cli.fail(f"--table_from={_TABLE_FROM.value}: {e} (a recall.json of the sweep)")
        print(grid_table(best, payload.get("lrs"), payload.get("steps")))
        return
    if _MERGE.value:
        for one in _MERGE.value.split(","):
            if not os.path.exists(one):
                cli.fail(f"--merge={_MERGE.value}: no such file {one} (a recall.json of a sweep)")
        for one in _LRS_FROM.value.split(",") if _LRS_FROM.value else []:
            if not os.path.exists(one):
                cli.fail(
                    f"--lrs_from={_LRS_FROM.value}: no such file {one} (a pilot's recall.json)"
                )
        try:
            payload = merge(_MERGE.value, _POINTS.value, _LRS_FROM.value)
        except ValueError as e:  # a pilot without a usable run of a mixer it ran
            cli.fail(str(e))
        except (KeyError, TypeError, json.JSONDecodeError) as e:
            cli.fail(f"--merge={_MERGE.value}: {type(e).__name__}: {e} (recall.json files)")
        _save(payload, plots=True)
        print(
            f"{len(payload['runs'])} runs, {len(payload['skipped'])} points without a finished run"
        )
        print(grid_table(payload["best"], payload["lrs"], payload["steps"]), flush=True)
        return
    # SIGINT (the device stage's time limit) must raise KeyboardInterrupt even when this
    # process started with it ignored (children of pytest-xdist workers, background jobs)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from seqmix.configs import recall
    from seqmix.experiments.bench import common

    mixers = _MIXERS.value or list(recall.MIXERS)
    d_models = [int(d) for d in (_DMODELS.value or recall.D_MODELS)]
    settings = [_setting(s) for s in _SETTINGS.value] if _SETTINGS.value else list(recall.SETTINGS)
    lrs = [float(x) for x in (_LRS.value or recall.LRS)]
    if _WORKERS.value < 1:
        cli.fail(f"--workers must be >= 1, got {_WORKERS.value}")
    if _DATA_PROCESSES.value is not None and _DATA_PROCESSES.value < 0:
        cli.fail(f"--data_processes must be >= 0, got {_DATA_PROCESSES.value}")
    _DATA["processes"] = data_processes(_DATA_PROCESSES.value, _WORKERS.value)
    # before the backend starts (jobs and compile workers alike)
    os.environ["XLA_FLAGS"] = concurrent_xla_flags(os.environ.get("XLA_FLAGS", ""), _WORKERS.value)
    if _ATTENTION_IMPL.value not in (None, "auto"):
        from seqmix.kernels import dispatch  # the package registers every op first

        try:
            dispatch.check_implementation(
                {"attention": _ATTENTION_IMPL.value}, "--attention_implementation"
            )
        except ValueError as e:
            cli.fail(str(e))
    for one in _RESUME.value.split(",") if _RESUME.value else []:
        if not os.path.exists(one):
            cli.fail(
                f"--resume={_RESUME.value}: no such file {one} (a recall.json of an earlier sweep)"
            )
    if _LRS_FROM.value:
        if _LRS.value:
            cli.fail("--lrs_from and --lrs are exclusive (the pilot chooses the rates)")
        for one in _LRS_FROM.value.split(","):
            if not os.path.exists(one):
                cli.fail(
                    f"--lrs_from={_LRS_FROM.value}: no such file {one} (a pilot's recall.json)"
                )
        try:
            lrs = pilot_rates(_LRS_FROM.value, mixers)
        except (ValueError, KeyError, json.JSONDecodeError) as e:
            cli.fail(f"--lrs_from={_LRS_FROM.value}: {e}")
        print(f"rates from the pilot {_LRS_FROM.value}: {lrs}", flush=True)
    jobs = [(m, d, T, n) for (T, n) in settings for d in d_models for m in mixers]
    if _POINTS.value:
        jobs = [j for j in jobs if matches(j, _POINTS.value)]
        if not jobs:
            cli.fail(f"--points={','.join(_POINTS.value)}: no point of the grid matches")
    jobs.sort(key=lambda j: -j[1] * j[2])  # longest first
    rows: list[dict] = []
    skipped: list[tuple] = []
    queue = queue_of(jobs, lrs)  # one job per point and rate
    if _RESUME.value:
        rows, queue = resume(_RESUME.value, jobs, lrs, _STEPS.value)
        if not _COMPILE_ONLY.value:
            print(
                f"resumed {len(rows)} runs from {_RESUME.value}; {len(queue)} jobs left",
                flush=True,
            )

    def resolve_attention():  # initialises the backend: after the compile workers start
        import jax

        impl = attention_implementation(
            _ATTENTION_IMPL.value, _WORKERS.value, jax.default_backend()
        )
        _ATTENTION["implementation"] = impl
        return impl

    if _COMPILE_FIRST.value is not None and _COMPILE_FIRST.value < 1:
        cli.fail(f"--compile_first must be >= 1, got {_COMPILE_FIRST.value}")
    first = _COMPILE_FIRST.value or len(queue)
    if _COMPILE_ONLY.value:
        resolve_attention()
        _compile_shard(_COMPILE_ONLY.value, [(*job, lr) for job, lr in queue][:first])
        return
    start = time.time()
    deadline = None if _DEADLINE.value is None else start + _DEADLINE.value
    if _COMPILE_WORKERS.value > 0 and queue:
        seconds = precompile.run_workers(
            "seqmix.experiments.recall_sweep",
            [
                f"--mixers={','.join(mixers)}",
                f"--d_models={','.join(map(str, d_models))}",
                f"--settings={','.join(f'{T}:{n}' for T, n in settings)}",
                *(
                    [f"--lrs_from={_LRS_FROM.value}"]
                    if _LRS_FROM.value
                    else [f"--lrs={','.join(map(str, lrs))}"]
                ),
                *([f"--points={','.join(_POINTS.value)}"] if _POINTS.value else []),
                f"--steps={_STEPS.value}",
                f"--batch_size={_BATCH.value}",
                f"--seed={_SEED.value}",
                f"--workers={_WORKERS.value}",
                *(
                    [f"--attention_implementation={_ATTENTION_IMPL.value}"]
                    if _ATTENTION_IMPL.value
                    else []
                ),
                *([f"--resume={_RESUME.value}"] if _RESUME.value else []),
                f"--compile_first={first}",
            ],
            _COMPILE_WORKERS.value,
            _COMPILE_BUDGET.value,
        )
        print(f"parallel compile: {seconds:.0f}s", flush=True)
    if resolve_attention() is not None:
        print(f"attention jobs ask for {_ATTENTION['implementation']}", flush=True)
    precompile.setup_cache()
    in_progress = lambda: list(_PROGRESS.values())
    resumed = len(rows)
    # earlier sweeps' runs on this device, with their concurrency: the speed before this
    # sweep has measured its own
    import jax

    kind = jax.devices()[0].device_kind
    priors = [r for r in rows if "concurrency" in r and r.get("device") == kind]
    # jobs cut by an earlier sweep resume from their kept workdirs (--runs_dir)
    kept = {(job, lr): kept_step(_RUNS_DIR.value, (*job, lr)) for job, lr in queue}
    pool = cf.ThreadPoolExecutor(_WORKERS.value)
    pending, interrupted = {}, None
    while queue or pending:
        held = False
        while queue and len(pending) < _WORKERS.value:
            if time.time() - start > _BUDGET.value:
                skipped.extend(queue)
                queue = []
                break
            # the longest job that can still finish before the deadline (a cut run's
            # training is lost: its workdir does not outlive the sweep)
            running = [
                (job + (lr,), _PROGRESS.get((*job, lr), {}).get("steps", kept.get((job, lr), 0)))
                for job, lr in pending.values()
            ]
            observed = rows[resumed:] + in_progress()
            i = next_job(queue, _STEPS.value, observed, deadline, running, priors, kept)
            if i is None and not pending:
                print(f"{len(queue)} jobs would not finish before the deadline", flush=True)
                skipped.extend(queue)
                queue = []
                break
            if i is None or i == WAIT:  # the running jobs' progress decides
                held = True
                break
            job, lr = queue.pop(i)
            future = pool.submit(
                run_job,
                *job,
                lr,
                _STEPS.value,
                _BATCH.value,
                _SEED.value,
                deadline,
                _RUNS_DIR.value,
            )
            pending[future] = (job, lr)
        if not pending:
            break
        try:
            # a job held back waits for the next evaluation or finish, not 30 s
            done, _ = cf.wait(pending, timeout=5 if held else 30, return_when=cf.FIRST_COMPLETED)
        except KeyboardInterrupt:  # the time limit: keep what the running jobs reached
            print("interrupted: running jobs evaluate, save and stop", flush=True)
            _STOP.set()
            skipped.extend(queue)
            queue, interrupted = [], time.time()
            continue
        for fut in done:
            job, lr = pending.pop(fut)
            try:
                rows.append(fut.result())
            except Exception as e:  # noqa: BLE001 - one failing job must not stop the sweep
                rows.append(
                    dict(
                        zip(("mixer", "d_model", "seq_len", "num_kv_pairs"), job),
                        lr=lr,
                        error=f"{type(e).__name__}: {str(e)[:300]}",
                    )
                )
            print(json.dumps(rows[-1], default=float), flush=True)
        # every 30 s and after every job: what a time limit or a kill would otherwise lose
        _write(rows + in_progress(), skipped + queue, lrs, start, plots=False)
        if interrupted is not None and time.time() - interrupted > 30:
            print(
                f"{len(pending)} jobs did not stop within 30 s (compiling?): left behind",
                flush=True,
            )
            break
    rows += in_progress()  # jobs left behind, as cut at their last evaluation
    best_rows = _write(rows, skipped, lrs, start)
    print(f"{len(rows)} runs in {time.time() - start:.0f}s, {len(skipped)} jobs skipped")
    print(
        common.markdown_table(
            best_rows,
            [
                "seq_len",
                "num_kv_pairs",
                "mixer",
                "d_model",
                "lr",
                "accuracy",
                "steps",
                "state_size",
                "seconds",
            ],
        ),
        flush=True,
    )
    print(grid_table(best_rows, lrs, _STEPS.value), flush=True)
    if pending:  # threads that are still compiling cannot be stopped: do not wait for them
        os._exit(0)
    pool.shutdown()


def run() -> None:
    """The ``seqmix-recall-sweep`` command."""
    cli.run(main, __doc__)


if __name__ == "__main__":
    run()
