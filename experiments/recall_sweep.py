"""The associative-recall study: every (mixer, d_model, setting) of configs/recall.py.

    python -m experiments.recall_sweep [--workers=4] [--steps=1500] [--budget_s=480]

Follows Zoology's MQAR protocol (vocabulary 8192, two layers, keys and values from the two
halves of the vocabulary, power-law query gaps, accuracy at the answer positions) with a
reduced training budget so that the grid fits one device session: ``steps`` updates of
``batch_size`` fresh sequences (1500 x 128 = 192k sequences against Zoology's 64 epochs of
100k, about 33x fewer), each run stopping early once its evaluation accuracy reaches 0.99.
For each (mixer, d_model, setting) one compiled step trains every learning rate of the sweep
at once: the rate lives in the optimizer state (``optax.inject_hyperparams``), and the step
is vmapped over a leading rate axis of the whole training state (same data for every rate).

Jobs run in ``--workers`` threads of one process (``--pool=threads``, the default): they
share one device allocator and one stream, so small models overlap their Python dispatch
and compilation without the GPU time-slicing between processes. (The first H200 run,
2026-11-28, used 10 processes: each step took ~0.3 s instead of milliseconds and the
per-process memory shares ran out; ``--pool=processes`` keeps that mode, each process with
``0.85 / workers`` of the memory and no preallocation.) Jobs are scheduled longest first and
none starts after ``budget_s``. Writes ``recall.json`` (every run,
the best rate per point, and the recurrent state size of each model: the floats of its
decoding cache at the sequence length) and two plots to ``--out_dir`` and ``$OUT``.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import multiprocessing
import os
import threading
import time

from absl import app, flags

_WORKERS = flags.DEFINE_integer("workers", 4, "Concurrent jobs sharing the device.")
_POOL = flags.DEFINE_enum("pool", "threads", ["threads", "processes"],
                          "Jobs in threads of this process or in worker processes.")
_STEPS = flags.DEFINE_integer("steps", 1500, "Training steps per run (upper bound).")
_BATCH = flags.DEFINE_integer("batch_size", 128, "Sequences per step.")
_BUDGET = flags.DEFINE_float("budget_s", 480.0, "No job starts after this many seconds.")
_MIXERS = flags.DEFINE_list("mixers", None, "Mixers (default: configs/recall.MIXERS).")
_DMODELS = flags.DEFINE_list("d_models", None, "Widths (default: configs/recall.D_MODELS).")
_SETTINGS = flags.DEFINE_list("settings", None, "seq_len:pairs items (default: all four).")
_LRS = flags.DEFINE_list("lrs", None, "Learning rates (default: configs/recall.LRS).")
_OUT = flags.DEFINE_string("out_dir", None, "Results folder (default benchmarks/results).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of models and data.")
_RESUME = flags.DEFINE_string("resume", None, "A recall.json of an earlier call: its finished "
                              "runs are kept and their jobs not run again (the grid can span "
                              "several device calls).")
_DEADLINE = flags.DEFINE_float("deadline_s", None, "Runs still training this many seconds after "
                               "the start stop at their next evaluation (marked 'cut').")


# Set on SIGINT (the stage's time limit): running jobs evaluate at once and return, cut.
_STOP = threading.Event()


def run_job(mixer, d_model, seq_len, pairs, lrs, steps, batch_size, seed,
            deadline=None) -> list[dict]:
    """Trains one grid point at every learning rate at once (one vmapped step); returns one
    row per rate, each finished at its first evaluation with accuracy >= 0.99, a non-finite
    loss, or the last step. Past ``deadline`` (a ``time.time()`` value) the runs evaluate
    within 50 steps and stop, and the rows of those still below 0.99 say ``cut``; after an
    interrupt (``_STOP``, threads only) they evaluate at once and stop the same way."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415
    import optax  # noqa: PLC0415
    from flax import nnx  # noqa: PLC0415

    from configs import recall  # noqa: PLC0415
    from seqmix import data, models  # noqa: PLC0415
    from seqmix.train import loop, losses, optimizer  # noqa: PLC0415

    cfg = recall.get_config(f"mixer={mixer},d_model={d_model},seq_len={seq_len},"
                            f"num_kv_pairs={pairs},steps={steps},batch_size={batch_size}")
    cfg.seed = seed
    task = data.make_task(cfg)
    parts = loop.split_model(cfg.model, seed)
    unit = cfg.optimizer.copy_and_resolve_references()
    unit.lr = 1.0  # the schedule's shape; the rate itself is a traced hyperparameter
    tx = optax.chain(optimizer.make_optimizer(unit, steps),
                     optax.inject_hyperparams(optax.scale)(step_size=1.0))
    schedule = optimizer.learning_rate_schedule(unit, steps)
    eval_set = [jax.device_put(b) for b in task.eval_batches()]

    model = models.build_model(cfg.model, rngs=nnx.Rngs(0))
    cache = jax.eval_shape(lambda: model.init_cache(1, seq_len))
    state_size = int(sum(x.size for x in jax.tree.leaves(cache)
                         if jnp.issubdtype(x.dtype, jnp.floating)) // len(cfg.model.layers))
    n_params = models.param_count(model)

    n = len(lrs)
    # Every learning rate trains at once: the step is vmapped over a leading rate axis of
    # the state (params, optimizer state with its step size, other), the batch is shared.
    train_v = jax.jit(jax.vmap(loop.make_train_step(parts, tx, schedule, "causal_lm", seed),
                               in_axes=(0, None, None, None)), donate_argnums=0)
    eval_v = jax.jit(jax.vmap(loop.make_eval_step(parts, "causal_lm", seed),
                              in_axes=(0, None, 0, None)))

    def evaluate(state, rngs):
        sums = None
        for b in eval_set:
            s = eval_v(state.params, rngs, state.other, b)
            sums = s if sums is None else jax.tree.map(jnp.add, sums, s)
        sums = jax.device_get(sums)
        return [losses.finish(jax.tree.map(lambda x, i=i: x[i], sums)) for i in range(n)]

    t0 = time.time()
    params, rngs, other = loop._init_state(cfg.model, seed, None)  # noqa: SLF001
    opt_state = tx.init(params)
    opt_state = (opt_state[0], opt_state[1]._replace(
        hyperparams={"step_size": jnp.asarray(1.0, jnp.float32)}))
    state = jax.tree.map(lambda x: jnp.broadcast_to(x, (n, *x.shape)),
                         loop.TrainState(params, opt_state, other))
    state = state._replace(opt_state=(state.opt_state[0], state.opt_state[1]._replace(
        hyperparams={"step_size": jnp.asarray(lrs, jnp.float32)})))
    result = [None] * n  # (accuracy, eval loss, steps, cut) once a rate is finished
    for step in range(1, steps + 1):
        state, metrics = train_v(state, rngs, task.train_batch(step), step)
        late = step < steps and (_STOP.is_set() or (
            deadline is not None and time.time() > deadline and step % 50 == 0))
        if step % 250 and step != steps and not late:
            continue
        losses_now = np.asarray(jax.device_get(metrics["loss"]))
        evals = evaluate(state, rngs)
        for i, ev in enumerate(evals):
            acc_i, loss_i = float(ev["accuracy"]), float(ev["loss"])
            if result[i] is not None:
                continue
            if not np.isfinite(losses_now[i]):
                result[i] = (float("nan"), float("nan"), step, False)
            elif acc_i >= 0.99 or step == steps or late:
                result[i] = (acc_i, loss_i, step, late and acc_i < 0.99)
        if all(r is not None for r in result):
            break
    seconds = time.time() - t0
    rows = []
    for lr, (accuracy, eval_loss, done, cut) in zip(lrs, result):
        rows.append(dict(mixer=mixer, d_model=d_model, seq_len=seq_len, num_kv_pairs=pairs,
                         lr=lr, accuracy=accuracy, eval_loss=eval_loss, steps=done, cut=cut,
                         seconds=seconds,
                         state_size=state_size, params=n_params))
    return rows


def _init_worker(workers: int):
    # each process grows its own pool up to its share, leaving the rest to the driver
    os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{0.85 / workers:.3f}"


def plot(best: list[dict], path_prefix: str) -> None:
    """Accuracy against d_model and against the recurrent state size, a panel per setting."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    settings = sorted({(r["seq_len"], r["num_kv_pairs"]) for r in best})
    mixers = sorted({r["mixer"] for r in best})
    for key, xlabel, scale, suffix in (("d_model", "d_model", dict(base=2), "_vs_dmodel.png"),
                                       ("state_size", "state size per layer (floats)", {},
                                        "_vs_state.png")):
        fig, axes = plt.subplots(1, len(settings), figsize=(4 * len(settings), 3.4),
                                 squeeze=False)
        for ax, (T, n) in zip(axes[0], settings):
            for m in mixers:
                pts = sorted((r[key], r["accuracy"]) for r in best
                             if r["mixer"] == m and (r["seq_len"], r["num_kv_pairs"]) == (T, n))
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
    from experiments.bench import common  # noqa: PLC0415

    best = {}
    for r in rows:
        if "error" in r:
            continue
        key = (r["mixer"], r["d_model"], r["seq_len"], r["num_kv_pairs"])
        if key not in best or r["accuracy"] > best[key]["accuracy"]:
            best[key] = r
    best_rows = sorted(best.values(), key=lambda r: (r["seq_len"], r["mixer"], r["d_model"]))
    payload = dict(env=common.environment(), steps=_STEPS.value, batch_size=_BATCH.value,
                   lrs=lrs, seconds=time.time() - start, runs=rows, best=best_rows,
                   skipped=[dict(zip(("mixer", "d_model", "seq_len", "num_kv_pairs"), j))
                            for j in skipped])
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
    kept = [r for r in kept
            if (r["mixer"], r["d_model"], r["seq_len"], r["num_kv_pairs"]) not in rerun]
    return kept, left


def main(argv):
    del argv
    from configs import recall  # noqa: PLC0415
    from experiments.bench import common  # noqa: PLC0415

    mixers = _MIXERS.value or list(recall.MIXERS)
    d_models = [int(d) for d in (_DMODELS.value or recall.D_MODELS)]
    settings = ([tuple(int(x) for x in s.split(":")) for s in _SETTINGS.value]
                if _SETTINGS.value else list(recall.SETTINGS))
    lrs = [float(x) for x in (_LRS.value or recall.LRS)]
    jobs = [(m, d, T, n) for (T, n) in settings for d in d_models for m in mixers]
    jobs.sort(key=lambda j: -j[1] * j[2])  # longest first
    rows, skipped = [], []
    if _RESUME.value and os.path.exists(_RESUME.value):
        rows, jobs = resume(_RESUME.value, jobs, lrs)
        print(f"resumed {len(rows)} runs from {_RESUME.value}; {len(jobs)} jobs left", flush=True)
    start = time.time()
    deadline = None if _DEADLINE.value is None else start + _DEADLINE.value
    if _POOL.value == "threads":
        executor = cf.ThreadPoolExecutor(_WORKERS.value)
    else:
        executor = cf.ProcessPoolExecutor(_WORKERS.value,
                                          mp_context=multiprocessing.get_context("spawn"),
                                          initializer=_init_worker, initargs=(_WORKERS.value,))
    with executor as pool:
        pending = {}
        queue = list(jobs)
        while queue or pending:
            while queue and len(pending) < _WORKERS.value:
                if time.time() - start > _BUDGET.value:
                    skipped.extend(queue)
                    queue = []
                    break
                job = queue.pop(0)
                pending[pool.submit(run_job, *job, lrs, _STEPS.value, _BATCH.value,
                                    _SEED.value, deadline)] = job
            if not pending:
                break
            try:
                done, _ = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
            except KeyboardInterrupt:  # the time limit: keep what the running jobs reached
                print("interrupted: running jobs stop at their next step", flush=True)
                _STOP.set()
                skipped.extend(queue)
                queue = []
                continue
            for fut in done:
                job = pending.pop(fut)
                try:
                    for r in fut.result():
                        rows.append(r)
                        print(json.dumps(r), flush=True)
                except Exception as e:  # noqa: BLE001 - one failing job must not stop the sweep
                    rows.append(dict(zip(("mixer", "d_model", "seq_len", "num_kv_pairs"), job),
                                     error=f"{type(e).__name__}: {str(e)[:300]}"))
                    print(json.dumps(rows[-1]), flush=True)
                _write(rows, skipped + queue, lrs, start, plots=False)  # survives a time limit
    best_rows = _write(rows, skipped, lrs, start)
    print(f"{len(rows)} runs in {time.time() - start:.0f}s, {len(skipped)} jobs skipped")
    print(common.markdown_table(best_rows, ["seq_len", "num_kv_pairs", "mixer", "d_model", "lr",
                                            "accuracy", "steps", "state_size", "seconds"]))


if __name__ == "__main__":
    app.run(main)
