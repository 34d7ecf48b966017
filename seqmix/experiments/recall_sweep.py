"""The associative-recall study: every (mixer, d_model, setting) of configs/recall.py.

    python -m seqmix.experiments.recall_sweep [--compile_workers=8] [--workers=4] [--steps=4000]

Follows Zoology's MQAR protocol (vocabulary 8192, two layers, keys and values from the two
halves of the vocabulary, power-law query gaps, accuracy at the answer positions) with a
reduced training budget (the grid spans device calls through ``--resume``): ``steps``
updates of ``batch_size`` fresh sequences (4000 x 256 = 1.02M sequences against Zoology's
64 epochs of 100k, about 6x fewer), each run stopping early once its evaluation accuracy
reaches 0.99.
For each (mixer, d_model, setting) one compiled step trains every learning rate of the sweep
at once: the rate lives in the optimizer state (``optax.inject_hyperparams``), and the step
is vmapped over a leading rate axis of the whole training state (same data for every rate);
``--novmap_rates`` runs one ordinary job per rate instead (the same compiled program).

Jobs run in ``--workers`` threads of one process: they share one device allocator and one
stream, so small models overlap their Python dispatch without the GPU time-slicing between
processes (the first H200 run, 2026-11-28, used 10 processes: each step took ~0.3 s and the
per-process memory shares ran out). Compilation is the other cost: two programs per job,
tens of seconds each on the GPU, one at a time in one process; ``--compile_workers=N``
first compiles every job in N processes into the persistent cache (``experiments/bench/
precompile.py``, at most ``--compile_budget_s``), so that the training threads start from
cache hits. Parameters are initialised on the host and copied over. Jobs are scheduled
longest first and none starts after ``budget_s``; each evaluation prints a progress line.
Writes ``recall.json`` (every run, the best rate per point, the recurrent state size of
each model: the floats of its decoding cache at the sequence length; rows of jobs still
training, as ``cut``, every 30 s) and two plots to ``--out_dir`` and ``$OUT``. On SIGINT the
running jobs evaluate and stop; those that do not within 30 s (still compiling) are left
behind with their last evaluation.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import signal
import threading
import time

from absl import app, flags

from seqmix.experiments.bench import precompile

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
_STEPS = flags.DEFINE_integer("steps", 4000, "Training steps per run (upper bound).")
_BATCH = flags.DEFINE_integer("batch_size", 256, "Sequences per step.")
_BUDGET = flags.DEFINE_float("budget_s", 480.0, "No job starts after this many seconds.")
_MIXERS = flags.DEFINE_list("mixers", None, "Mixers (default: configs/recall.MIXERS).")
_DMODELS = flags.DEFINE_list("d_models", None, "Widths (default: configs/recall.D_MODELS).")
_SETTINGS = flags.DEFINE_list("settings", None, "seq_len:pairs items (default: all four).")
_LRS = flags.DEFINE_list("lrs", None, "Learning rates (default: configs/recall.LRS).")
_OUT = flags.DEFINE_string("out_dir", None, "Results folder (default benchmarks/results).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of models and data.")
_RESUME = flags.DEFINE_string(
    "resume",
    None,
    "A recall.json of an earlier call: its finished "
    "runs are kept and their jobs not run again (the grid can span "
    "several device calls).",
)
_VMAP = flags.DEFINE_bool(
    "vmap_rates",
    True,
    "Train every rate of a grid point in one step "
    "vmapped over a rate axis; false: one job per rate, each an ordinary "
    "step (the same compiled program for every rate).",
)
_DEADLINE = flags.DEFINE_float(
    "deadline_s",
    None,
    "Runs still training this many seconds after "
    "the start evaluate within 50 steps and stop (marked 'cut').",
)


# Set on SIGINT (the stage's time limit): running jobs evaluate at once and return, cut.
_STOP = threading.Event()
# job -> rows of its latest evaluation (cut), written with the results while it trains
_PROGRESS: dict[tuple, list[dict]] = {}
_EVAL_EVERY = 250


def _build(mixer, d_model, seq_len, pairs, lrs, steps, batch_size, seed, vmap=True):
    """The programs and data of one grid point: a dict with ``task``, the jitted vmapped
    ``train``/``eval`` steps, ``init`` (the concrete stacked state, built on the host CPU and
    copied over), ``abstract`` (the arguments' shapes, for compiling ahead) and the sizes.
    With ``vmap=False`` (one rate only) the steps and the state have no rate axis."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from seqmix import data, models
    from seqmix.configs import recall
    from seqmix.train import loop, optimizer

    cfg = recall.get_config(
        f"mixer={mixer},d_model={d_model},seq_len={seq_len},"
        f"num_kv_pairs={pairs},steps={steps},batch_size={batch_size}"
    )
    cfg.seed = seed
    task = data.make_task(cfg)
    parts = loop.split_model(cfg.model, seed)
    unit = cfg.optimizer.copy_and_resolve_references()
    unit.lr = 1.0  # the schedule's shape; the rate itself is a traced hyperparameter
    tx = optax.chain(
        optimizer.make_optimizer(unit, steps), optax.inject_hyperparams(optax.scale)(step_size=1.0)
    )
    schedule = optimizer.learning_rate_schedule(unit, steps)
    model = nnx.eval_shape(lambda: models.build_model(cfg.model, rngs=nnx.Rngs(0)))
    cache = jax.eval_shape(lambda: model.init_cache(1, seq_len))
    state_size = int(
        sum(x.size for x in jax.tree.leaves(cache) if jnp.issubdtype(x.dtype, jnp.floating))
        // len(cfg.model.layers)
    )
    n_params = int(sum(x.size for x in jax.tree.leaves(parts.params)))
    n = len(lrs)
    if not vmap and n != 1:
        raise ValueError(f"without the rate vmap a job trains one rate, got lrs={lrs}")

    def init():
        """``(state, rngs)``: one training state per rate, stacked on a leading axis (one
        unstacked state without the vmap)."""
        params, rngs, other = loop._init_state(cfg.model, seed, None)
        opt_state = tx.init(params)
        opt_state = (
            opt_state[0],
            opt_state[1]._replace(hyperparams={"step_size": jnp.asarray(1.0, jnp.float32)}),
        )
        state = loop.TrainState(params, opt_state, other)
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
        # on the host: a jitted initialiser can take minutes to compile on the GPU
        with jax.default_device(jax.devices("cpu")[0]):
            made = init()
        return jax.device_put(made, jax.devices()[0])

    # With the vmap every learning rate trains at once: the step is vmapped over a leading
    # rate axis of the state (params, optimizer state with its step size, other), the batch
    # is shared.
    train_step = loop.make_train_step(parts, tx, schedule, "causal_lm", seed)
    eval_step = loop.make_eval_step(parts, "causal_lm", seed)
    if vmap:
        train_step = jax.vmap(train_step, in_axes=(0, None, None, None))
        eval_step = jax.vmap(eval_step, in_axes=(0, None, 0, None))
    train = jax.jit(train_step, donate_argnums=0)
    evaluate = jax.jit(eval_step)
    spec = lambda b: {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in b.items()}
    state, rngs = jax.eval_shape(init)
    abstract = dict(
        train=(state, rngs, spec(task.train_batch(0)), jax.ShapeDtypeStruct((), jnp.int32)),
        eval=(state.params, rngs, state.other, spec(task.eval_batches()[0])),
    )
    return dict(
        task=task,
        train=train,
        eval=evaluate,
        init=host_init,
        abstract=abstract,
        state_size=state_size,
        n_params=n_params,
    )


def compile_job(b: dict) -> tuple:
    """The compiled ``(train, eval)`` steps of a ``_build``, always lowered from the abstract
    arguments: the parallel compile workers and the training thread lower the same module,
    so the thread's compile is a persistent-cache hit (concrete, committed arrays would add
    sharding annotations and miss)."""
    return (
        b["train"].lower(*b["abstract"]["train"]).compile(),
        b["eval"].lower(*b["abstract"]["eval"]).compile(),
    )


def run_job(
    mixer, d_model, seq_len, pairs, lrs, steps, batch_size, seed, deadline=None, vmap=True
) -> list[dict]:
    """Trains one grid point at every learning rate at once (one vmapped step; with
    ``vmap=False`` at its single rate, an ordinary step); returns one
    row per rate, each finished at its first evaluation with accuracy >= 0.99, a non-finite
    loss, or the last step. Past ``deadline`` (a ``time.time()`` value) the runs evaluate
    within 50 steps and stop, and the rows of those still below 0.99 say ``cut``; after an
    interrupt (``_STOP``, threads only) they evaluate at once and stop the same way. Each
    evaluation prints a progress line and leaves the rows so far in ``_PROGRESS``."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from seqmix.train import losses

    job = (mixer, d_model, seq_len, pairs) if vmap else (mixer, d_model, seq_len, pairs, lrs[0])
    t0 = time.time()
    b = _build(mixer, d_model, seq_len, pairs, lrs, steps, batch_size, seed, vmap)
    task, n = b["task"], len(lrs)
    train, evaluate_step = compile_job(b)
    eval_set = [jax.device_put(x) for x in task.eval_batches()]
    state, rngs = b["init"]()

    def evaluate(state):
        sums = None
        for e in eval_set:
            s = evaluate_step(state.params, rngs, state.other, e)
            sums = s if sums is None else jax.tree.map(jnp.add, sums, s)
        sums = jax.device_get(sums)
        if not vmap:
            return [losses.finish(sums)]
        return [losses.finish(jax.tree.map(lambda x, i=i: x[i], sums)) for i in range(n)]

    def rows_of(result, seconds):
        return [
            dict(
                mixer=mixer,
                d_model=d_model,
                seq_len=seq_len,
                num_kv_pairs=pairs,
                lr=lr,
                accuracy=acc,
                eval_loss=loss,
                steps=done,
                cut=cut,
                seconds=seconds,
                state_size=b["state_size"],
                params=b["n_params"],
            )
            for lr, (acc, loss, done, cut) in zip(lrs, result)
        ]

    result = [None] * n  # (accuracy, eval loss, steps, cut) once a rate is finished
    for step in range(1, steps + 1):
        batch = {k: jnp.asarray(v) for k, v in task.train_batch(step).items()}
        state, metrics = train(state, rngs, batch, jnp.asarray(step, jnp.int32))
        if step == 1:
            jax.block_until_ready(metrics)
            print(
                f"{job} first step (build, init, compile) after {time.time() - t0:.1f}s", flush=True
            )
        late = step < steps and (
            _STOP.is_set() or (deadline is not None and time.time() > deadline and step % 50 == 0)
        )
        if step % _EVAL_EVERY and step != steps and not late:
            continue
        losses_now = np.atleast_1d(np.asarray(jax.device_get(metrics["loss"])))
        evals = evaluate(state)
        for i, ev in enumerate(evals):
            acc_i, loss_i = float(ev["accuracy"]), float(ev["loss"])
            if result[i] is not None:
                continue
            if not np.isfinite(losses_now[i]):
                result[i] = (float("nan"), float("nan"), step, False)
            elif acc_i >= 0.99 or step == steps or late:
                result[i] = (acc_i, loss_i, step, late and acc_i < 0.99)
        print(
            f"{job} step {step} accuracy {[round(float(e['accuracy']), 3) for e in evals]} "
            f"after {time.time() - t0:.0f}s",
            flush=True,
        )
        _PROGRESS[job] = rows_of(
            [
                r or (float(e["accuracy"]), float(e["loss"]), step, True)
                for r, e in zip(result, evals)
            ],
            time.time() - t0,
        )
        if all(r is not None for r in result):
            break
    _PROGRESS.pop(job, None)
    return rows_of(result, time.time() - t0)


def _compile_shard(spec: str, jobs: list[tuple], lrs: list[float]) -> None:
    precompile.setup_cache()
    # without the rate vmap every rate of a job runs the same program: compile it once
    lrs = lrs if _VMAP.value else lrs[:1]
    for job in precompile.shard(jobs, spec):
        t0 = time.time()
        try:
            compile_job(_build(*job, lrs, _STEPS.value, _BATCH.value, _SEED.value, _VMAP.value))
            print(f"compiled {job} in {time.time() - t0:.0f}s", flush=True)
        except Exception as e:  # noqa: BLE001 - the driver compiles it again and reports
            print(f"compile {job} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)


def plot(best: list[dict], path_prefix: str) -> None:
    """Accuracy against d_model and against the recurrent state size, a panel per setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = sorted({(r["seq_len"], r["num_kv_pairs"]) for r in best})
    mixers = sorted({r["mixer"] for r in best})
    for key, xlabel, scale, suffix in (
        ("d_model", "d_model", dict(base=2), "_vs_dmodel.png"),
        ("state_size", "state size per layer (floats)", {}, "_vs_state.png"),
    ):
        fig, axes = plt.subplots(1, len(settings), figsize=(4 * len(settings), 3.4), squeeze=False)
        for ax, (T, n) in zip(axes[0], settings):
            for m in mixers:
                pts = sorted(
                    (r[key], r["accuracy"])
                    for r in best
                    if r["mixer"] == m and (r["seq_len"], r["num_kv_pairs"]) == (T, n)
                )
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=m)
            ax.set_xscale("log", **scale)
            ax.set_ylim(0, 1.02)
            ax.set_title(f"T={T}, {n} pairs")
            ax.set_xlabel(xlabel)
        axes[0][0].set_ylabel("MQAR accuracy")
        axes[0][-1].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path_prefix + suffix, dpi=110)
        plt.close(fig)


def _write(rows, skipped, lrs, start, plots=True) -> list[dict]:
    """recall.json (every run, the best rate per point, the jobs not run) and the plots."""
    from seqmix.experiments.bench import common

    best = {}
    for r in rows:
        if "error" in r:
            continue
        key = (r["mixer"], r["d_model"], r["seq_len"], r["num_kv_pairs"])
        if key not in best or r["accuracy"] > best[key]["accuracy"]:
            best[key] = r
    best_rows = sorted(best.values(), key=lambda r: (r["seq_len"], r["mixer"], r["d_model"]))
    payload = dict(
        env=common.environment(),
        steps=_STEPS.value,
        batch_size=_BATCH.value,
        lrs=lrs,
        seconds=time.time() - start,
        runs=rows,
        best=best_rows,
        skipped=[
            dict(zip(("mixer", "d_model", "seq_len", "num_kv_pairs"), j))
            for j in dict.fromkeys(skipped)
        ],
    )
    for d in filter(None, [_OUT.value or common.RESULTS_DIR, os.environ.get("OUT")]):
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "recall.json"), "w") as f:
            json.dump(payload, f, indent=1, default=float)
        if plots and best_rows:
            plot(best_rows, os.path.join(d, "recall"))
    return best_rows


def resume(path: str, jobs: list[tuple], lrs: list[float]) -> tuple[list[dict], list[tuple]]:
    """The finished runs of an earlier recall.json (no error, not cut by a deadline) and the
    jobs of ``jobs`` that still lack a finished run at some rate of ``lrs``."""
    with open(path) as f:
        earlier = json.load(f)["runs"]
    kept = [r for r in earlier if "error" not in r and not r.get("cut")]
    done = {(r["mixer"], r["d_model"], r["seq_len"], r["num_kv_pairs"], r["lr"]) for r in kept}
    left = [j for j in jobs if any((*j, lr) not in done for lr in lrs)]
    rerun = set(left)  # a job runs again at every rate: drop its earlier rows
    kept = [
        r for r in kept if (r["mixer"], r["d_model"], r["seq_len"], r["num_kv_pairs"]) not in rerun
    ]
    return kept, left


def _setting(item: str) -> tuple[int, int]:
    """``"seq_len:pairs"`` of ``--settings`` as two ints."""
    try:
        T, n = (int(x) for x in item.split(":"))
    except ValueError:
        raise ValueError(
            f"--settings items are seq_len:pairs (e.g. 256:16), got {item!r}"
        ) from None
    return T, n


def main(argv):
    del argv
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
        raise ValueError(f"--workers must be >= 1, got {_WORKERS.value}")
    if _RESUME.value and not os.path.exists(_RESUME.value):
        raise ValueError(
            f"--resume={_RESUME.value}: no such file (a recall.json of an earlier call)"
        )
    jobs = [(m, d, T, n) for (T, n) in settings for d in d_models for m in mixers]
    jobs.sort(key=lambda j: -j[1] * j[2])  # longest first
    rows, skipped = [], []
    if _RESUME.value:
        rows, jobs = resume(_RESUME.value, jobs, lrs)
        if not _COMPILE_ONLY.value:
            print(
                f"resumed {len(rows)} runs from {_RESUME.value}; {len(jobs)} jobs left", flush=True
            )
    if _COMPILE_ONLY.value:
        _compile_shard(_COMPILE_ONLY.value, jobs, lrs)
        return
    start = time.time()
    deadline = None if _DEADLINE.value is None else start + _DEADLINE.value
    if _COMPILE_WORKERS.value > 0 and jobs:
        seconds = precompile.run_workers(
            "seqmix.experiments.recall_sweep",
            [
                f"--mixers={','.join(mixers)}",
                f"--d_models={','.join(map(str, d_models))}",
                f"--settings={','.join(f'{T}:{n}' for T, n in settings)}",
                f"--lrs={','.join(map(str, lrs))}",
                f"--steps={_STEPS.value}",
                f"--batch_size={_BATCH.value}",
                f"--seed={_SEED.value}",
                f"--vmap_rates={_VMAP.value}",
                *([f"--resume={_RESUME.value}"] if _RESUME.value else []),
            ],
            _COMPILE_WORKERS.value,
            _COMPILE_BUDGET.value,
        )
        print(f"parallel compile: {seconds:.0f}s", flush=True)
    precompile.setup_cache()
    in_progress = lambda: [r for job_rows in list(_PROGRESS.values()) for r in job_rows]
    pool = cf.ThreadPoolExecutor(_WORKERS.value)
    # a queue entry: a grid point and the rates it trains (all at once, or one per entry)
    queue = (
        [(job, tuple(lrs)) for job in jobs]
        if _VMAP.value
        else [(job, (lr,)) for job in jobs for lr in lrs]
    )
    pending, interrupted = {}, None
    while queue or pending:
        while queue and len(pending) < _WORKERS.value:
            if time.time() - start > _BUDGET.value:
                skipped.extend(job for job, _ in queue)
                queue = []
                break
            job, job_lrs = queue.pop(0)
            pending[
                pool.submit(
                    run_job,
                    *job,
                    list(job_lrs),
                    _STEPS.value,
                    _BATCH.value,
                    _SEED.value,
                    deadline,
                    _VMAP.value,
                )
            ] = (job, job_lrs)
        if not pending:
            break
        try:
            done, _ = cf.wait(pending, timeout=30, return_when=cf.FIRST_COMPLETED)
        except KeyboardInterrupt:  # the time limit: keep what the running jobs reached
            print("interrupted: running jobs stop at their next step", flush=True)
            _STOP.set()
            skipped.extend(job for job, _ in queue)
            queue, interrupted = [], time.time()
            continue
        for fut in done:
            job, job_lrs = pending.pop(fut)
            try:
                for r in fut.result():
                    rows.append(r)
                    print(json.dumps(r), flush=True)
            except Exception as e:  # noqa: BLE001 - one failing job must not stop the sweep
                rows.append(
                    dict(
                        zip(("mixer", "d_model", "seq_len", "num_kv_pairs"), job),
                        **({"lr": job_lrs[0]} if len(job_lrs) == 1 else {}),
                        error=f"{type(e).__name__}: {str(e)[:300]}",
                    )
                )
                print(json.dumps(rows[-1]), flush=True)
        # every 30 s and after every job: what a time limit or a kill would otherwise lose
        _write(rows + in_progress(), skipped + [job for job, _ in queue], lrs, start, plots=False)
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
    if pending:  # threads that are still compiling cannot be stopped: do not wait for them
        os._exit(0)
    pool.shutdown()


if __name__ == "__main__":
    app.run(main)
