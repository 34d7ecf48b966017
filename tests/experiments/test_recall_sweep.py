"""The recall sweep: jobs trained by the one loop (its evaluation, early stop at 0.99,
deadline and interrupt), resuming across invocations, compile workers that fill the cache
the jobs hit."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import jax
import pytest

from seqmix.experiments import recall_sweep


def _run(mixer, d, T, n, lr, **extra):
    """A row of a run trained with the point's current model config."""
    extra.setdefault("model", recall_sweep.point_signature(mixer, d, T, n))
    return dict(
        mixer=mixer, d_model=d, seq_len=T, num_kv_pairs=n, lr=lr, accuracy=0.5, steps=10, **extra
    )


def test_rows_of_an_earlier_model_config_are_retired(tmp_path):
    """A row counts for resume and pilot only with its point's current model signature:
    one that the study's config has since changed runs again and chooses no rate."""
    sig = recall_sweep.point_signature
    assert sig("gla", 64, 64, 4) == sig("gla", 64, 64, 4)
    assert sig("gla", 64, 64, 4) != sig("gla", 128, 64, 4) != sig("mamba2", 128, 64, 4)
    # the signature sees the mixer's own config, not the kernel choice or other mixers'
    config = recall_sweep.job_config("gla", 64, 64, 4, 1e-3, 10, 2, 0)
    base = recall_sweep.model_signature(config)
    assert base == sig("gla", 64, 64, 4)
    config.model.implementation = {"attention": "xla"}
    config.model.mixers.mamba2.d_state = 8
    assert recall_sweep.model_signature(config) == base
    config.model.mixers.gla.short_conv = False
    assert recall_sweep.model_signature(config) != base
    stale = _run("gla", 64, 64, 4, 3e-3, eval_loss=1.0, model=recall_sweep.model_signature(config))
    unsigned = _run("based", 64, 64, 4, 3e-3, eval_loss=1.0)
    del unsigned["model"]
    path = tmp_path / "earlier.json"
    fresh = _run("attention", 64, 64, 4, 3e-3, eval_loss=1.0)
    path.write_text(json.dumps({"runs": [stale, unsigned, fresh]}))
    jobs = [(m, 64, 64, 4) for m in ("gla", "based", "attention")]
    kept, left = recall_sweep.resume(str(path), jobs, [3e-3])
    assert [r["mixer"] for r in kept] == ["attention"]
    assert [job[0] for job, _ in left] == ["gla", "based"]
    assert recall_sweep.pilot_rates(str(path), ["attention"]) == {"attention": 3e-3}
    for mixer in ("gla", "based"):
        try:
            recall_sweep.pilot_rates(str(path), [mixer])
        except ValueError as e:
            assert "earlier model config" in str(e)
        else:
            raise AssertionError(f"{mixer}: a retired row must not choose a rate")


def test_resume_keeps_finished_runs_and_reruns_the_rest(tmp_path):
    lrs = [1e-3, 3e-3]
    error = dict(mixer="mamba2", d_model=64, seq_len=64, num_kv_pairs=4, lr=1e-3, error="OOM")
    earlier = [
        _run("attention", 64, 64, 4, 1e-3),
        _run("attention", 64, 64, 4, 3e-3),  # done
        _run("gla", 64, 64, 4, 1e-3),  # done; its other rate is missing
        _run("based", 64, 64, 4, 1e-3, cut=True),  # cut: runs again
        _run("based", 64, 64, 4, 3e-3),
        error,
        _run("attention", 128, 64, 4, 1e-3),  # not in this grid: kept in the results
        _run("mamba2", 128, 64, 4, 1e-3, cut=True),  # cut, not in this grid: kept, hollow
        _run("mamba2", 128, 64, 4, 3e-3, model="an earlier config"),  # retired
    ]
    path = tmp_path / "recall.json"
    path.write_text(json.dumps({"runs": earlier}))
    jobs = [(m, 64, 64, 4) for m in ("attention", "gla", "based", "mamba2")]
    kept, left = recall_sweep.resume(str(path), jobs, lrs)
    assert left == [
        (("gla", 64, 64, 4), 3e-3),
        (("based", 64, 64, 4), 1e-3),
        (("mamba2", 64, 64, 4), 1e-3),
        (("mamba2", 64, 64, 4), 3e-3),
    ]
    assert [(r["mixer"], r["d_model"], r["lr"]) for r in kept] == [
        ("attention", 64, 1e-3),
        ("attention", 64, 3e-3),
        ("gla", 64, 1e-3),
        ("based", 64, 3e-3),
        ("attention", 128, 1e-3),
        ("mamba2", 128, 1e-3),  # the cut run (based's at 1e-3 trains again: dropped)
    ]
    # several files (a grid's and a pilot's): their runs together, each job once
    pilot = tmp_path / "pilot.json"
    pilot.write_text(
        json.dumps(
            {"runs": [_run("gla", 64, 64, 4, 3e-3), dict(_run("gla", 64, 64, 4, 1e-3), steps=7)]}
        )
    )
    kept, left = recall_sweep.resume(f"{path},{pilot}", jobs, lrs)
    assert (("gla", 64, 64, 4), 3e-3) not in left and len(left) == 3
    assert [r["steps"] for r in kept if r["mixer"] == "gla"] == [10, 10]  # the first file's
    # a run that met the target, or a rerun at a larger budget, replaces a run that missed
    longer = tmp_path / "longer.json"
    longer.write_text(
        json.dumps(
            {
                "runs": [
                    dict(_run("based", 64, 64, 4, 3e-3), steps=40, max_steps=40),
                    dict(_run("attention", 64, 64, 4, 3e-3), steps=40, max_steps=40),
                    dict(_run("gla", 64, 64, 4, 1e-3), accuracy=0.995, steps=5, max_steps=5),
                ]
            }
        )
    )
    earlier[4] = dict(earlier[4], accuracy=0.5)  # based at 3e-3 missed
    earlier[1] = dict(earlier[1], accuracy=0.995)  # attention at 3e-3 met the target
    earlier[2] = dict(earlier[2], max_steps=10)  # gla at 1e-3 missed on a larger budget
    path.write_text(json.dumps({"runs": earlier}))
    kept, _ = recall_sweep.resume(f"{path},{longer}", jobs, lrs)
    by = {(r["mixer"], r["d_model"], r["lr"]): r["steps"] for r in kept}
    assert by[("based", 64, 3e-3)] == 40 and by[("attention", 64, 3e-3)] == 10
    assert by[("gla", 64, 1e-3)] == 5  # it met the target on a smaller budget: it replaces


def test_a_pilot_chooses_one_rate_per_mixer(tmp_path):
    def run(mixer, lr, accuracy, loss, d=128, **extra):
        return dict(_run(mixer, d, 256, 16, lr, **extra), accuracy=accuracy, eval_loss=loss)

    pilot = [
        run("attention", 1e-3, 0.40, 2.0),
        run("attention", 3e-3, 0.99, 0.1),  # stopped at the target: the best
        run("attention", 1e-2, 0.60, 1.0),
        run("gla", 1e-3, 0.0002, 8.5),  # nothing learned at any rate: the lowest loss wins
        run("gla", 3e-3, 0.0001, 7.9),
        run("gla", 1e-2, float("nan"), float("nan")),  # diverged: never chosen
        run("based", 1e-2, 0.2, 3.0, error="OOM"),  # failed: never chosen
        run("based", 1e-3, 0.1, 4.0),
        run("based", 1e-3, 0.3, 2.0, d=64),  # two points: the mean decides
        run("based", 3e-3, 0.25, 2.5),
        run("based", 3e-3, 0.05, 5.0, d=64),
    ]
    path = tmp_path / "pilot.json"
    path.write_text(json.dumps({"runs": pilot}))
    rates = recall_sweep.pilot_rates(str(path), ["attention", "gla", "based"])
    assert rates == {"attention": 3e-3, "gla": 3e-3, "based": 1e-3}
    # two pilots (one per group of mixers) read as one
    (tmp_path / "a.json").write_text(json.dumps({"runs": pilot[:3]}))
    (tmp_path / "b.json").write_text(json.dumps({"runs": pilot[3:]}))
    both = f"{tmp_path / 'a.json'},{tmp_path / 'b.json'}"
    assert recall_sweep.pilot_rates(both, ["attention", "gla", "based"]) == rates
    try:
        recall_sweep.pilot_rates(str(path), ["mamba2"])
    except ValueError as e:
        assert "--lrs_from" in str(e) and "mamba2" in str(e)
    else:
        raise AssertionError("a mixer without pilot runs must raise")
    # the best run of a point ranks the same way: a diverged run never wins, even first
    nan = run("gla", 1e-2, float("nan"), float("nan"))
    assert max([nan, pilot[3], pilot[4]], key=recall_sweep.run_score) is pilot[4]
    jobs = [("attention", 64, 64, 4), ("gla", 64, 64, 4)]
    assert recall_sweep.queue_of(jobs, rates) == [(jobs[0], 3e-3), (jobs[1], 3e-3)]
    (tmp_path / "earlier.json").write_text(json.dumps({"runs": [_run("gla", 64, 64, 4, 3e-3)]}))
    kept, left = recall_sweep.resume(str(tmp_path / "earlier.json"), jobs, rates)
    assert left == [(jobs[0], 3e-3)] and [r["mixer"] for r in kept] == ["gla"]


def test_run_job_is_the_loop_and_stops_at_the_deadline_saying_so(monkeypatch):
    past = time.time() - 1.0
    # an attention kernel chosen by --attention_implementation reaches the model's config
    monkeypatch.setitem(recall_sweep._ATTENTION, "implementation", "xla")
    config = recall_sweep.job_config("based", 64, 64, 4, 1e-3, 500, 4, 0)
    assert dict(config.model.implementation) == {"attention": "xla"}
    row = recall_sweep.run_job("attention", 64, 64, 4, 1e-3, 500, 4, 0, deadline=past)
    # the deadline had passed: the loop stopped after its first steps, evaluated and saved
    assert row["cut"] and row["steps"] <= 2 and row["lr"] == 1e-3
    assert 0.0 <= row["accuracy"] <= 1.0 and row["state_size"] > 0 and row["params"] > 0
    assert row["compute_dtype"] == "bfloat16"  # the recall configs' mixed precision
    assert row["device"] == jax.devices()[0].device_kind
    assert row["max_steps"] == 500
    assert row["attention_implementation"] == "xla"
    assert row["model"] == recall_sweep.point_signature("attention", 64, 64, 4)
    assert row["concurrency"] == pytest.approx(1.0, abs=0.01)  # it ran alone


def test_concurrent_gpu_jobs_keep_attention_off_cudnn():
    choose = recall_sweep.attention_implementation
    assert choose(None, 4, "gpu") == "pallas_triton"  # cuDNN's graph capture vs other jobs
    assert choose(None, 1, "gpu") is None and choose(None, 4, "cpu") is None
    assert choose("auto", 4, "gpu") is None and choose("cudnn", 4, "gpu") == "cudnn"
    assert (
        recall_sweep.job_config("attention", 64, 64, 4, 1e-3, 5, 4, 0).model.implementation is None
    )
    # and XLA's command buffers (CUDA graphs) off for concurrent jobs, unless set already
    flags = recall_sweep.concurrent_xla_flags
    assert flags("--a=1", 4) == "--a=1 --xla_gpu_enable_command_buffer="
    assert flags("", 4) == "--xla_gpu_enable_command_buffer="
    assert flags("--a=1", 1) == "--a=1"
    kept = "--xla_gpu_enable_command_buffer=FUSION"
    assert flags(kept, 4) == kept
    # and each concurrent job makes its batches in a process of its own
    assert recall_sweep.data_processes(None, 4) == 1 and recall_sweep.data_processes(None, 1) == 0
    assert recall_sweep.data_processes(3, 1) == 3


def test_a_jobs_batches_come_from_the_resolved_number_of_processes(monkeypatch):
    monkeypatch.setitem(recall_sweep._DATA, "processes", 2)
    assert recall_sweep.job_config("gla", 64, 64, 4, 1e-3, 5, 4, 0).train.data_processes == 2


def test_a_cut_job_resumes_from_its_kept_workdir(monkeypatch, tmp_path):
    job = ("attention", 64, 64, 4, 1e-3)
    assert (
        recall_sweep.kept_step(str(tmp_path), job) == 0 and recall_sweep.kept_step(None, job) == 0
    )
    cut = recall_sweep.run_job(*job, 500, 4, 0, deadline=time.time() - 1.0, runs_dir=str(tmp_path))
    assert cut["cut"] and cut["start_step"] == 0
    assert recall_sweep.kept_step(str(tmp_path), job) == cut["steps"] > 0
    monkeypatch.setattr(recall_sweep, "TARGET_ACCURACY", 0.0)  # stop at the next evaluation
    monkeypatch.setattr(recall_sweep, "_EVAL_EVERY", 5)
    row = recall_sweep.run_job(*job, 500, 4, 0, runs_dir=str(tmp_path))
    assert row["start_step"] == cut["steps"] and row["steps"] == 5 and not row["cut"]
    # its speed counts the steps of this run after its first (which loaded the programs)
    assert 0 < row["step_seconds"] < row["seconds"] / (5 - cut["steps"])
    assert recall_sweep.device_seconds_per_step(row) == pytest.approx(
        row["step_seconds"] / row["concurrency"]
    )
    del row["step_seconds"]  # without it: the seconds over the steps this run trained
    assert recall_sweep.device_seconds_per_step(row) == pytest.approx(
        row["seconds"] / (5 - cut["steps"]) / row["concurrency"]
    )


def test_a_job_stops_early_at_the_target_accuracy(monkeypatch):
    config = recall_sweep.job_config("attention", 64, 64, 4, 1e-3, 500, 4, 0)
    assert config.train.eval_every == 250  # the sweep's cadence
    monkeypatch.setattr(recall_sweep, "TARGET_ACCURACY", 0.0)  # any evaluation reaches it
    monkeypatch.setattr(recall_sweep, "_EVAL_EVERY", 5)  # its first evaluation comes sooner
    # the deadline test's job (the same programs)
    row = recall_sweep.run_job("attention", 64, 64, 4, 1e-3, 500, 4, 0)
    assert row["steps"] == 5 and not row["cut"]  # the first evaluation, not step 500


def test_the_probe_programs_train_what_the_loop_trains():
    """The profiling programs (a rate axis in the optimizer state, vmapped) follow the
    loop's run at the same rate: the same evaluation loss after 20 steps."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from seqmix.train import losses

    steps, lr = 20, 1e-2
    row = recall_sweep.run_job("attention", 64, 64, 4, lr, steps, 4, 0)
    b = recall_sweep.probe_programs("attention", 64, 64, 4, [1e-3, lr], steps, 4, 0)
    train, evaluate = recall_sweep.compile_job(b)
    state, rngs = b["init"]()
    for step in range(1, steps + 1):
        batch = {k: jnp.asarray(v) for k, v in b["task"].train_batch(step).items()}
        state, _ = train(state, rngs, batch, jnp.asarray(step, jnp.int32))
    sums = None
    for e in b["task"].eval_batches():
        s = evaluate(state.params, rngs, state.other, {k: jnp.asarray(v) for k, v in e.items()})
        sums = s if sums is None else jax.tree.map(jnp.add, sums, s)
    loss = losses.finish(jax.tree.map(lambda x: np.asarray(x)[1], jax.device_get(sums)))["loss"]
    assert abs(loss - row["eval_loss"]) < 1e-3 * row["eval_loss"], (loss, row["eval_loss"])


def test_plots_accuracy_against_width_and_state(tmp_path):
    import matplotlib.axes
    import numpy as np

    best = [
        dict(mixer=m, d_model=d, seq_len=T, num_kv_pairs=n, accuracy=0.5, state_size=d * 100)
        for m in ("attention", "gla")
        for d in (64, 128)
        for T, n in ((64, 4), (128, 8))
    ]
    # a mixer missing from one panel must not shift the others' colours there
    best += [dict(best[0], mixer="based", seq_len=128, num_kv_pairs=8)]
    drawn = []  # (panel, colour, x values) of every line drawn
    real = matplotlib.axes.Axes.plot

    def spy(ax, x, y, *args, **kw):
        drawn.append((id(ax), kw.get("color"), tuple(np.atleast_1d(x))))
        return real(ax, x, y, *args, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(matplotlib.axes.Axes, "plot", spy)
        recall_sweep.plot(best, str(tmp_path / "recall"))
    for suffix in ("_vs_dmodel.png", "_vs_state.png"):
        png = (tmp_path / f"recall{suffix}").read_bytes()
        assert png[:4] == b"\x89PNG" and len(png) > 5000
    # the lines of gla and attention (width 64 and 128, state 100x that)
    lines = [(panel, color) for panel, color, x in drawn if x in ((64, 128), (6400, 12800))]
    panels = sorted({p for p, _ in lines})
    assert len(panels) == 4  # two settings, two figures
    for panel in panels:
        assert sorted(c for p, c in lines if p == panel) == ["C0", "C2"]  # based is C1


@pytest.mark.parametrize("data_processes", [0, 1], ids=["thread", "batch-process"])
def test_sigint_stops_the_sweep_and_keeps_the_cut_runs(tmp_path, data_processes):
    # A caller's time limit sends SIGINT: the running job must stop within a step,
    # be written as cut, and the process exit (a hung sweep would lose the whole run).
    # started with SIGINT ignored, as under a pytest-xdist worker or in a background job
    # (by the shell: a preexec_fn would run Python in a forked child of this JAX process).
    # With a batch process the signal goes to the whole process group, as a terminal's
    # Ctrl-C or `timeout` sends it: the batch process must survive it.
    cmd = [
        sys.executable,
        "-m",
        "seqmix.experiments.recall_sweep",
        "--mixers=attention",
        "--d_models=64",
        "--settings=64:4",
        "--lrs=1e-3",
        "--steps=1000000",
        "--batch_size=4",
        f"--out_dir={tmp_path}",
        "--workers=1",
        f"--data_processes={data_processes}",
    ]
    proc = subprocess.Popen(
        ["sh", "-c", 'trap "" INT; exec "$@"', "sh", *cmd],
        env=dict(os.environ, OUT=""),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group
    )
    # SIGINT once the job trains (its first step compiled and ran)
    watchdog = threading.Timer(300, proc.kill)  # a sweep that never trains fails below
    watchdog.start()
    head = []
    try:
        for line in proc.stdout:
            head.append(line)
            if "(compile and run) took" in line:
                break
    finally:
        watchdog.cancel()
    if data_processes:
        os.killpg(proc.pid, signal.SIGINT)
    else:
        proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    out = "".join(head) + out
    assert proc.returncode == 0, out[-2000:]
    runs = json.loads((tmp_path / "recall.json").read_text())["runs"]
    assert len(runs) == 1 and runs[0]["cut"] and runs[0]["steps"] < 1000000, runs


def test_compile_workers_fill_the_cache_that_the_jobs_hit(tmp_path):
    # A compile worker (--compile_only) writes both programs of a job into the persistent
    # cache; the training loop of the same job, in another process, finds both there.
    env = dict(os.environ, TMPDIR=str(tmp_path), OUT="")
    flags = [
        "--mixers=gla",
        "--d_models=64",
        "--settings=64:4",
        "--lrs=1e-3",
        "--steps=3",
        "--batch_size=4",
    ]
    subprocess.run(
        [sys.executable, "-m", "seqmix.experiments.recall_sweep", "--compile_only=0/1", *flags],
        env=env,
        check=True,
        capture_output=True,
        timeout=300,
    )
    cached = (tmp_path / "seqmix_jax_cache").iterdir()
    assert any(p.name.startswith("jit_train_step") for p in cached)
    check = (
        "import logging, sys\n"
        "from absl import flags\n"
        "from seqmix.experiments import recall_sweep as rs\n"
        "from seqmix.experiments.bench import precompile\n"
        "flags.FLAGS(sys.argv[:1])\n"
        "import os\n"  # the XLA flags of the sweep's main process (4 workers by default)
        "os.environ['XLA_FLAGS'] = rs.concurrent_xla_flags(os.environ.get('XLA_FLAGS', ''), 4)\n"
        "hits = []\n"
        "class H(logging.Handler):\n"
        "    def emit(self, r):\n"
        "        m = r.getMessage()\n"
        "        if m.startswith('Persistent compilation cache hit'): hits.append(m)\n"
        "log = logging.getLogger('jax._src.compiler')\n"
        "log.setLevel(logging.DEBUG); log.addHandler(H())\n"
        "precompile.setup_cache()\n"
        "rs.run_job('gla', 64, 64, 4, 1e-3, 3, 4, 0)\n"
        "print('HITS', sorted({m.split(chr(39))[1] for m in hits}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", check], env=env, capture_output=True, text=True, timeout=300
    )
    assert "'jit_train_step'" in out.stdout and "'jit_eval_step'" in out.stdout, (
        out.stdout[-1000:] + out.stderr[-2000:]
    )


def test_bad_flags_name_the_flag(tmp_path):
    for flag, needle in (
        ("--settings=256x16", "--settings"),
        ("--workers=0", "--workers"),
        ("--data_processes=-1", "--data_processes"),
        ("--compile_first=0", "--compile_first"),
        ("--points=gla:99:*:*", "--points"),
        ("--attention_implementation=cuda", "--attention_implementation"),
        (f"--resume={tmp_path}/none.json", "--resume"),
        (f"--lrs_from={tmp_path}/none.json", "--lrs_from"),
        (f"--lrs_from={tmp_path}/pilot.json --lrs=1e-3", "--lrs_from"),
        (f"--lrs_from={tmp_path}/empty.json --mixers=gla", "--lrs_from"),
    ):
        (tmp_path / "pilot.json").write_text(json.dumps({"runs": []}))
        (tmp_path / "empty.json").write_text(json.dumps({"runs": [_run("based", 64, 64, 4, 1)]}))
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "seqmix.experiments.recall_sweep",
                *flag.split(),
                f"--out_dir={tmp_path}",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            env=dict(os.environ, OUT=""),
        )
        assert out.returncode != 0 and needle in out.stderr, (flag, out.stderr[-500:])


def test_recall_probe_times_every_variant_and_lists_device_ops(tmp_path):
    from seqmix.experiments.device import recall_probe

    row = recall_probe.probe(
        "gla", 16, 64, 4, batch_size=4, steps=1, out=str(tmp_path), trace=True, vmapped=True
    )
    for key in ("compile_s", "host_ms", "vmapped_ms", "single_ms", "eval_ms"):
        assert row[key] > 0, key
    assert row["top_ops"] and all(ms >= 0 and n >= 1 for _, ms, n in row["top_ops"])
    # every op counted once in its kind; the GPU kernel time per step is their sum over 3 steps
    kinds = row["ops_by_kind"]
    assert sum(n for _, n in kinds.values()) >= sum(n for _, _, n in row["top_ops"])
    assert abs(sum(ms for ms, _ in kinds.values()) / 3 - row["device_ms_per_step"]) < 1e-6
    kind = recall_probe.op_kind
    assert kind("nvjet_sm90_tst_128x128") == "matmul" and kind("loop_add_fusion_1") == "xla fusion"
    assert kind("linear_attention_chunk_dqk__1") == "kernel" and kind("cudnn_sdpa") == "cudnn"
    assert (tmp_path / "hlo_gla_d16_64_4.txt").read_text().startswith("HloModule")
    assert not (tmp_path / "trace_gla_d16_64_4").exists()  # summarized, then removed


def test_a_failing_job_is_a_row_naming_its_rate(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "seqmix.experiments.recall_sweep",
        "--mixers=no_such_mixer",
        "--d_models=64",
        "--settings=64:4",
        "--lrs=1e-3,3e-3",
        "--steps=2",
        "--batch_size=2",
        f"--out_dir={tmp_path}",
        "--workers=1",
    ]
    subprocess.run(cmd, env=dict(os.environ, OUT=""), check=True, timeout=300, capture_output=True)
    runs = json.loads((tmp_path / "recall.json").read_text())["runs"]
    assert sorted(r["lr"] for r in runs) == [1e-3, 3e-3]
    assert all(r["mixer"] == "no_such_mixer" and "no_such_mixer" in r["error"] for r in runs)
    # with a pilot's rates: one job per point, at the mixer's rate
    pilot = tmp_path / "pilot.json"
    pilot.write_text(
        json.dumps(
            {
                "runs": [
                    dict(_run("no_such_mixer", 64, 64, 4, 1e-3), eval_loss=3.0),
                    dict(_run("no_such_mixer", 64, 64, 4, 3e-3), eval_loss=2.0),
                ]
            }
        )
    )
    cmd = [c for c in cmd if not c.startswith("--lrs=")] + [f"--lrs_from={pilot}"]
    subprocess.run(cmd, env=dict(os.environ, OUT=""), check=True, timeout=300, capture_output=True)
    runs = json.loads((tmp_path / "recall.json").read_text())["runs"]
    assert [r["lr"] for r in runs] == [3e-3]


def test_with_a_deadline_and_no_measure_the_first_job_starts_alone(tmp_path):
    # Two jobs, two workers, a far deadline: without any speed measured the second waits
    # for the first's evaluation (here its last step), so neither ran beside the other.
    cmd = [
        sys.executable,
        "-m",
        "seqmix.experiments.recall_sweep",
        "--mixers=attention",
        "--d_models=32,64",
        "--settings=64:4",
        "--lrs=1e-3",
        "--steps=3",
        "--batch_size=2",
        f"--out_dir={tmp_path}",
        "--workers=2",
        "--data_processes=0",
        "--deadline_s=900",
    ]
    subprocess.run(cmd, env=dict(os.environ, OUT=""), check=True, timeout=300, capture_output=True)
    runs = json.loads((tmp_path / "recall.json").read_text())["runs"]
    assert sorted(r["d_model"] for r in runs) == [32, 64] and not any(r["cut"] for r in runs)
    assert all(1.0 <= r["concurrency"] < 1.3 for r in runs), runs


def test_compile_workers_prepare_only_the_first_jobs_when_told(tmp_path):
    """--compile_first=N: a compile worker's shard is cut to the queue's first N jobs
    (longest first), those that a time-limited call reaches."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "seqmix.experiments.recall_sweep",
            "--compile_only=0/1",
            "--compile_first=1",
            "--mixers=linear_attention,gla",
            "--d_models=16,32",
            "--settings=64:4",
            "--lrs=1e-3",
            "--steps=2",
            "--batch_size=2",
        ],
        env=dict(os.environ, TMPDIR=str(tmp_path), OUT=""),
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    compiled = [line for line in out.stdout.splitlines() if line.startswith("compiled ")]
    assert len(compiled) == 1 and "('linear_attention', 32, 64, 4, 0.001)" in compiled[0], compiled


def test_a_runs_concurrency_is_the_mean_number_of_jobs_beside_it(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(recall_sweep.time, "time", lambda: clock[0])
    occupancy = recall_sweep.Occupancy()
    first = occupancy.enter()
    clock[0] = 110.0
    second = occupancy.enter()  # 10 s alone, then 10 s beside another
    clock[0] = 120.0
    assert occupancy.mean_since(first) == pytest.approx(1.5)
    occupancy.leave()
    clock[0] = 130.0  # the other alone for 10 s
    assert occupancy.mean_since(second) == pytest.approx(1.5)
    assert occupancy.mean_since(first) == pytest.approx((10 + 20 + 10) / 30)


def test_a_job_starts_only_if_the_accelerator_time_owed_ends_before_the_deadline():
    expect = recall_sweep.expected_seconds
    assert expect(("gla", 128, 256, 16), 3000, []) is None  # nothing observed yet

    def timed(mixer, d, T, n, steps, seconds, concurrency=1.0):
        return dict(
            _run(mixer, d, T, n, 1e-3), steps=steps, seconds=seconds, concurrency=concurrency
        )

    seen = [
        timed("gla", 512, 512, 64, 1000, 400.0, concurrency=4.0),  # 0.1 s of the accelerator a step
        timed("mamba2", 128, 256, 16, 500, 10.0),  # 0.02 s a step
        # a row from before the count: taken as alone, 0.04 s a step
        dict(_run("mamba2", 128, 256, 16, 1e-3), steps=500, seconds=20.0),
        _run("gla", 64, 256, 16, 1e-2, error="OOM"),  # a failed run says nothing
    ]
    assert recall_sweep.device_seconds_per_step(seen[0]) == pytest.approx(0.1)
    # the time per step after the first step, where the row has it
    timed_after_first = dict(seen[0], step_seconds=0.2)
    assert recall_sweep.device_seconds_per_step(timed_after_first) == pytest.approx(0.05)
    # the same size: the mean of those runs, preferring the same mixer when it has one
    assert expect(("mamba2", 128, 256, 16), 1000, seen) == pytest.approx(30.0)
    assert expect(("based", 128, 256, 16), 1000, seen) == pytest.approx(30.0)
    assert expect(("gla", 512, 512, 64), 1000, seen) == pytest.approx(100.0)
    # from the nearest size: larger, scaled by the work; smaller, by its square root
    assert expect(("gla", 512, 1024, 64), 1000, seen) == pytest.approx(200.0)
    assert expect(("gla", 256, 256, 16), 1000, seen) == pytest.approx(30.0 * 2)
    assert expect(("gla", 256, 512, 64), 1000, seen) == pytest.approx(100.0 * 0.5**0.5)
    # equally near from both sides: each run scaled to the job's size, then the mean
    both = [timed("gla", 64, 256, 16, 100, 1.0), timed("gla", 256, 256, 16, 100, 4.0)]
    assert expect(("gla", 128, 256, 16), 100, both) == pytest.approx((2.0 + 4.0 * 0.5**0.5) / 2)
    # an earlier sweep's run counts where this sweep has none as near, and yields to one
    prior = [timed("gla", 512, 512, 64, 1000, 50.0)]
    assert expect(("gla", 512, 512, 64), 1000, [], prior) == pytest.approx(50.0)
    assert expect(("gla", 512, 512, 64), 1000, seen, prior) == pytest.approx(100.0)

    queue = [(("gla", 512, 512, 64), 3e-3), (("mamba2", 128, 256, 16), 3e-3)]
    now = time.time()
    # 300 s for the first against 200 s left: the shorter job (90 s) takes its place
    assert recall_sweep.next_job(queue, 3000, seen, now + 200) == 1
    assert recall_sweep.next_job(queue, 3000, seen, now + 400) == 0
    assert recall_sweep.next_job(queue, 3000, seen, now + 50) is None
    assert recall_sweep.next_job(queue, 3000, seen, None) == 0  # no deadline
    # the accelerator time still owed to running jobs comes first: a gla job 1000 steps in owes
    # 200 s, so only the 90 s job fits in 300 s, and nothing in 250 s
    running = [(("gla", 512, 512, 64, 3e-3), 1000)]
    assert recall_sweep.next_job(queue, 3000, seen, now + 300, running) == 1
    assert recall_sweep.next_job(queue, 3000, seen, now + 250, running) is None
    assert recall_sweep.next_job(queue, 3000, seen, now + 600, running) == 0
    # speed unknown: the first job starts alone, the next waits for its evaluations
    assert recall_sweep.next_job(queue, 3000, [], now + 1) == 0
    started = [(("gla", 512, 512, 64, 3e-3), 0)]
    assert recall_sweep.next_job(queue[1:], 3000, [], now + 1, started) == recall_sweep.WAIT
    # ... unless an earlier sweep on this device measured it
    assert recall_sweep.next_job(queue[1:], 3000, [], now + 1000, started, prior) == 0
    # a queued job that resumes a kept workdir owes only its remaining steps: the gla job
    # 2000 steps in needs 100 s, and now fits in 150 s
    kept = {queue[0]: 2000}
    assert recall_sweep.next_job(queue, 3000, seen, now + 150, done=kept) == 0
    assert recall_sweep.next_job(queue, 3000, seen, now + 150) == 1


def test_the_grid_table_has_a_cell_per_point_and_marks_cut_runs(tmp_path):
    best = [
        dict(_run("mamba2", 512, 256, 16, 3e-3), accuracy=0.557, steps=2752, cut=True),
        dict(_run("attention", 128, 256, 16, 1e-2), accuracy=0.9947, steps=1750, cut=False),
        dict(_run("attention", 512, 512, 64, 1e-2), accuracy=0.9952, steps=1750, cut=False),
    ]
    lines = recall_sweep.grid_table(best).splitlines()
    assert lines[0] == "| setting | mixer | d_model 128 | d_model 512 |"
    assert lines[2:] == [
        "| (256, 16) | attention | 0.995 (1750) | – |",
        "| (256, 16) | mamba2 | – | 0.557 (cut at 2752) |",
        "| (512, 64) | attention | – | 0.995 (1750) |",
    ]
    # a run at another rate than the grid's, or on another step budget, says so
    best[0] = dict(best[0], max_steps=None)  # a row that names no budget: nothing to say
    best[1] = dict(best[1], max_steps=10000)
    best[2] = dict(best[2], lr=3e-3)
    lrs = {"attention": 1e-2, "mamba2": 3e-3}
    lines = recall_sweep.grid_table(best, lrs, 3000).splitlines()
    assert lines[2:] == [
        "| (256, 16) | attention | 0.995 (1750; budget 10000) | – |",
        "| (256, 16) | mamba2 | – | 0.557 (cut at 2752) |",
        "| (512, 64) | attention | – | 0.995 (1750; lr 0.003) |",
    ]
    path = tmp_path / "recall.json"
    path.write_text(json.dumps({"best": best, "lrs": lrs, "steps": 3000}))
    out = subprocess.run(
        [sys.executable, "-m", "seqmix.experiments.recall_sweep", f"--table_from={path}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.splitlines() == lines


@pytest.mark.parametrize("mixer", ["gated_deltanet", "deltanet"])
def test_the_delta_rule_mixers_run_in_the_study_config(mixer):
    import numpy as np

    from seqmix.configs import recall
    from seqmix.train import steps

    config = recall.get_config(f"mixer={mixer},d_model=64,seq_len=32,num_kv_pairs=4")
    assert config.model.layers == [mixer, mixer]
    model = steps.build(steps.model_config_of(config), 0)
    tokens = np.random.default_rng(0).integers(0, 8192, (2, 32)).astype(np.int32)
    logits = model(tokens)
    assert logits.shape == (2, 32, 8192) and np.isfinite(np.asarray(logits, np.float32)).all()
    # a point of its own: its rows are never taken for another mixer's
    assert recall_sweep.point_signature(mixer, 64, 32, 4) != recall_sweep.point_signature(
        "gla", 64, 32, 4
    )


def test_points_choose_part_of_the_grid():
    patterns = ["*:*:256:16", "mamba2:*:*:*"]
    assert recall_sweep.matches(("gla", 64, 256, 16), patterns)
    assert recall_sweep.matches(("mamba2", 512, 64, 4), patterns)
    assert not recall_sweep.matches(("gla", 64, 64, 4), patterns)
    assert not recall_sweep.matches(("attention", 128, 512, 64), ["attention:1*:512:64x"])


def test_a_larger_step_budget_trains_the_runs_that_missed_the_target_again(tmp_path):
    earlier = [
        dict(_run("attention", 64, 256, 16, 1e-2), accuracy=0.08, steps=3000),  # file's budget
        dict(_run("attention", 128, 256, 16, 1e-2), accuracy=0.995, steps=1750),  # solved
        dict(_run("gla", 64, 256, 16, 1e-2), accuracy=0.5, steps=10000, max_steps=10000),
    ]
    path = tmp_path / "recall.json"
    path.write_text(json.dumps({"steps": 3000, "runs": earlier}))
    jobs = [("attention", 64, 256, 16), ("attention", 128, 256, 16), ("gla", 64, 256, 16)]
    kept, left = recall_sweep.resume(str(path), jobs, [1e-2], steps=3000)
    assert left == [] and [r["max_steps"] for r in kept] == [3000, 3000, 10000]
    kept, left = recall_sweep.resume(str(path), jobs, [1e-2], steps=10000)
    assert left == [(("attention", 64, 256, 16), 1e-2)]
    # attention at d_model 64 trains again; gla's 10000-step run stands
    assert [(r["mixer"], r["d_model"]) for r in kept] == [("attention", 128), ("gla", 64)]


def test_merge_writes_one_study_of_several_sweeps(tmp_path):
    older = {
        "env": {"date": "2026-01-01T00:00:00+00:00", "device": "A"},
        "steps": 3000,
        "lrs": {"attention": 1e-2, "gla": 1e-2, "based": 1e-2},
        "runs": [_run("attention", 64, 64, 4, 1e-2, device="A", state_size=100)],
    }
    newer = {
        "env": {"date": "2026-02-01T00:00:00+00:00", "device": "B"},
        "steps": 3000,
        "lrs": {"attention": 1e-2, "gla": 3e-3, "based": 1e-2},
        "runs": [
            # resumed from the older file
            _run("attention", 64, 64, 4, 1e-2, device="A", state_size=100),
            _run("gla", 64, 64, 4, 3e-3, device="B", state_size=100),
            _run("based", 64, 64, 4, 1e-2, device="B", cut=True, state_size=100),  # not finished
        ],
    }
    # a later sweep over a list of rates (a side study) does not replace the grid's rates
    side = {
        "env": {"date": "2026-03-01T00:00:00+00:00", "device": "C"},
        "steps": 10000,
        "lrs": [3e-3],
        "runs": [],
    }
    paths = []
    for name, payload in (("older", older), ("newer", newer), ("side", side)):
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(payload))
    merged = recall_sweep.merge(
        ",".join(map(str, paths)), ["attention:64:64:4", "gla:64:64:4", "based:64:64:4"]
    )
    assert merged["env"]["device"] == "C" and merged["steps"] == 3000
    assert merged["lrs"] == newer["lrs"]
    paths.pop()
    merged = recall_sweep.merge(
        ",".join(map(str, paths)), ["attention:64:64:4", "gla:64:64:4", "based:64:64:4"]
    )
    assert merged["env"]["device"] == "B" and merged["lrs"]["gla"] == 3e-3
    assert [(r["mixer"], r.get("cut", False)) for r in merged["runs"]] == [
        ("attention", False),
        ("gla", False),
        ("based", True),
    ]
    assert [r["mixer"] for r in merged["best"]] == ["attention", "based", "gla"]
    assert merged["skipped"] == [
        dict(mixer="based", d_model=64, seq_len=64, num_kv_pairs=4, lr=1e-2)
    ]
    # by default the study's 80 points: all but attention's (gla's (64, 4) is not one)
    assert len(recall_sweep.merge(",".join(map(str, paths)))["skipped"]) == 79
    # the launcher writes it with its plots
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "seqmix.experiments.recall_sweep",
            f"--merge={paths[0]},{paths[1]}",
            f"--out_dir={tmp_path / 'merged'}",
        ],
        env=dict(os.environ, OUT=""),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    written = json.loads((tmp_path / "merged" / "recall.json").read_text())
    assert len(written["runs"]) == 3 and "79 points without a finished run" in out
    bad = subprocess.run(
        [sys.executable, "-m", "seqmix.experiments.recall_sweep", "--merge=nope.json"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode != 0 and "--merge=nope.json" in bad.stderr


def test_merge_takes_the_rates_of_mixers_added_later_from_their_pilot(tmp_path):
    """A mixer swept after the grid's pilot gets the grid rate its own pilot chose (the best
    mean accuracy there); the grid's rates of the other mixers stay, and a rate named in a
    cell's note is one that differs from it."""
    grid = {
        "env": {"date": "2026-01-01T00:00:00+00:00"},
        "steps": 3000,
        "lrs": {"attention": 1e-2, "gla": 1e-2},
        "runs": [_run("attention", 64, 256, 16, 1e-2)],
    }
    pilot = {
        "env": {"date": "2026-02-01T00:00:00+00:00"},
        "steps": 3000,
        "lrs": [3e-3, 1e-2],
        "runs": [
            dict(_run("deltanet", 128, 256, 16, 3e-3), accuracy=0.99, eval_loss=0.1),
            dict(_run("deltanet", 128, 256, 16, 1e-2), accuracy=0.9, eval_loss=0.5),
            # the grid already has gla's rate: its pilot runs change nothing
            dict(_run("gla", 128, 256, 16, 3e-3), accuracy=0.99, eval_loss=0.1),
        ],
    }
    side = {  # the deltanet points, one at another rate
        "env": {"date": "2026-03-01T00:00:00+00:00"},
        "steps": 3000,
        "lrs": [1e-3],
        "runs": [dict(_run("deltanet", 512, 512, 64, 1e-3), accuracy=0.99, eval_loss=0.1)],
    }
    paths = []
    for name, payload in (("grid", grid), ("pilot", pilot), ("side", side)):
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(payload))
    files = ",".join(map(str, paths))
    merged = recall_sweep.merge(files, pilots=str(paths[1]))
    assert merged["lrs"] == {"attention": 1e-2, "gla": 1e-2, "deltanet": 3e-3}
    assert {(r["mixer"], r["lr"]) for r in merged["skipped"] if r["mixer"] == "deltanet"} == {
        ("deltanet", 3e-3)
    }
    assert recall_sweep.merge(files)["lrs"] == grid["lrs"]  # without the pilot: the grid's
    table = recall_sweep.grid_table(merged["best"], merged["lrs"], merged["steps"])
    assert "0.990 (10; lr 0.001)" in table and "0.990 (10)" in table
    # the launcher: --lrs_from names the pilot; a missing one is named
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "seqmix.experiments.recall_sweep",
            f"--merge={files}",
            "--lrs_from=nope.json",
            f"--out_dir={tmp_path / 'merged'}",
        ],
        capture_output=True,
        text=True,
    )
    assert bad.returncode != 0 and "--lrs_from=nope.json" in bad.stderr


def test_the_best_run_of_a_point_is_a_finished_one_at_equal_accuracy():
    """Of two runs of a point at the same accuracy (to 3 decimals), the table shows the one
    that trained its whole budget, whatever the losses; a better accuracy wins even cut."""
    finished = dict(_run("gla", 512, 512, 64, 3e-3), accuracy=0.0004, eval_loss=8.4)
    cut = dict(_run("gla", 512, 512, 64, 1e-3), accuracy=0.0003, eval_loss=8.2, cut=True)
    assert recall_sweep.best_runs([finished, cut]) == [finished]
    assert recall_sweep.best_runs([cut, finished]) == [finished]
    better = dict(cut, accuracy=0.5)
    assert recall_sweep.best_runs([finished, better]) == [better]
