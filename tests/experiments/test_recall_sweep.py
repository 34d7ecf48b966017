"""The recall sweep's bookkeeping: resuming across device calls and the per-run deadline."""

import json
import os
import signal
import subprocess
import sys
import time

from seqmix.experiments import recall_sweep


def _run(mixer, d, T, n, lr, **extra):
    return dict(
        mixer=mixer, d_model=d, seq_len=T, num_kv_pairs=n, lr=lr, accuracy=0.5, steps=10, **extra
    )


def test_resume_keeps_finished_runs_and_reruns_the_rest(tmp_path):
    lrs = [1e-3, 3e-3]
    earlier = [
        _run("attention", 64, 64, 4, 1e-3),
        _run("attention", 64, 64, 4, 3e-3),  # done
        _run("gla", 64, 64, 4, 1e-3),  # one rate missing: rerun, its row dropped
        _run("based", 64, 64, 4, 1e-3, cut=True),
        _run("based", 64, 64, 4, 3e-3),  # cut
        {"mixer": "mamba2", "d_model": 64, "seq_len": 64, "num_kv_pairs": 4, "error": "OOM"},
    ]
    path = tmp_path / "recall.json"
    path.write_text(json.dumps({"runs": earlier}))
    jobs = [(m, 64, 64, 4) for m in ("attention", "gla", "based", "mamba2", "linear_attention")]
    kept, left = recall_sweep.resume(str(path), jobs, lrs)
    assert left == [(m, 64, 64, 4) for m in ("gla", "based", "mamba2", "linear_attention")]
    assert [(r["mixer"], r["lr"]) for r in kept] == [("attention", 1e-3), ("attention", 3e-3)]


def test_run_job_stops_at_the_deadline_and_says_so():
    past = time.time() - 1.0
    rows = recall_sweep.run_job(
        "attention", 64, 64, 4, [1e-3, 3e-3], steps=500, batch_size=4, seed=0, deadline=past
    )
    # the deadline had passed: both rates (trained together) stop at the first evaluation
    assert [r["lr"] for r in rows] == [1e-3, 3e-3]
    for r in rows:
        assert r["cut"] and r["steps"] == 50
        assert 0.0 <= r["accuracy"] <= 1.0 and r["state_size"] > 0


def test_vmapped_rates_match_separate_runs():
    """The rate axis is only a batch axis: training at [lr] alone gives the same model as the
    same rate inside a vmapped pair (compared through the evaluation loss). 100 steps: the
    batched and unbatched matmuls round differently, and Adam amplifies that over hundreds of
    steps (1e-7 relative at step 100, 2e-3 at step 250 on the CPU)."""
    pair = recall_sweep.run_job("mamba2", 64, 64, 4, [1e-3, 1e-2], steps=100, batch_size=4, seed=0)
    alone = recall_sweep.run_job("mamba2", 64, 64, 4, [1e-2], steps=100, batch_size=4, seed=0)
    assert pair[1]["lr"] == alone[0]["lr"] == 1e-2
    assert pair[1]["steps"] == alone[0]["steps"] == 100
    assert abs(pair[1]["eval_loss"] - alone[0]["eval_loss"]) < 1e-4 * alone[0]["eval_loss"]
    # the sweep's --novmap_rates job: the same rate, an ordinary step without the rate axis
    plain = recall_sweep.run_job(
        "mamba2", 64, 64, 4, [1e-2], steps=100, batch_size=4, seed=0, vmap=False
    )
    assert plain[0]["lr"] == 1e-2 and plain[0]["steps"] == 100
    assert abs(plain[0]["eval_loss"] - alone[0]["eval_loss"]) < 1e-4 * alone[0]["eval_loss"]
    # and the other rate trained a different model
    assert abs(pair[0]["eval_loss"] - pair[1]["eval_loss"]) > 1e-3


def test_plots_accuracy_against_width_and_state(tmp_path):
    best = [
        dict(mixer=m, d_model=d, seq_len=T, num_kv_pairs=n, accuracy=0.5, state_size=d * 100)
        for m in ("attention", "gla")
        for d in (64, 128)
        for T, n in ((64, 4), (128, 8))
    ]
    recall_sweep.plot(best, str(tmp_path / "recall"))
    for suffix in ("_vs_dmodel.png", "_vs_state.png"):
        png = (tmp_path / f"recall{suffix}").read_bytes()
        assert png[:4] == b"\x89PNG" and len(png) > 5000


def test_sigint_stops_the_sweep_and_keeps_the_cut_runs(tmp_path):
    # The device stage's time limit sends SIGINT: the running job must stop within a step,
    # be written as cut, and the process exit (a hung sweep lost a whole device call).
    # started with SIGINT ignored, as under a pytest-xdist worker or in a background job
    # (by the shell: a preexec_fn would run Python in a forked child of this JAX process)
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
    ]
    proc = subprocess.Popen(
        ["sh", "-c", 'trap "" INT; exec "$@"', "sh", *cmd],
        env=dict(os.environ, OUT=""),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    time.sleep(20)  # compiling or training
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-2000:]
    runs = json.loads((tmp_path / "recall.json").read_text())["runs"]
    assert len(runs) == 1 and runs[0]["cut"] and runs[0]["steps"] < 1000000, runs


def test_compile_workers_fill_the_cache_that_the_jobs_hit(tmp_path):
    # A compile worker (--compile_only) writes both programs of a job into the persistent
    # cache; a later process building the same job compiles nothing (two cache hits).
    env = dict(os.environ, TMPDIR=str(tmp_path), OUT="")
    flags = [
        "--mixers=gla",
        "--d_models=64",
        "--settings=64:4",
        "--lrs=1e-3,3e-3",
        "--steps=100",
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
        "import sys, jax\n"
        "from absl import flags\n"
        "from seqmix.experiments import recall_sweep as rs\n"
        "from seqmix.experiments.bench import precompile\n"
        "flags.FLAGS(sys.argv[:1])\n"
        "hits = []\n"
        "jax.monitoring.register_event_listener(lambda e, **kw: hits.append(e)"
        " if e == '/jax/compilation_cache/cache_hits' else None)\n"
        "precompile.setup_cache()\n"
        "rs.compile_job(rs._build('gla', 64, 64, 4, [1e-3, 3e-3], 100, 4, 0))\n"
        "print('HITS', len(hits))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", check], env=env, capture_output=True, text=True, timeout=300
    )
    assert "HITS 2" in out.stdout, out.stdout[-1000:] + out.stderr[-2000:]


def test_bad_flags_name_the_flag(tmp_path):
    for flag, needle in (
        ("--settings=256x16", "--settings"),
        ("--workers=0", "--workers"),
        (f"--resume={tmp_path}/none.json", "--resume"),
    ):
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "seqmix.experiments.recall_sweep",
                flag,
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

    row = recall_probe.probe("gla", 16, 64, 4, batch_size=4, steps=1, out=str(tmp_path), trace=True)
    for key in ("compile_s", "host_ms", "vmapped_ms", "single_ms", "eval_ms"):
        assert row[key] > 0, key
    assert row["top_ops"] and all(ms >= 0 and n >= 1 for _, ms, n in row["top_ops"])
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
        "--novmap_rates",
        "--steps=2",
        "--batch_size=2",
        f"--out_dir={tmp_path}",
        "--workers=1",
    ]
    subprocess.run(cmd, env=dict(os.environ, OUT=""), check=True, timeout=300, capture_output=True)
    runs = json.loads((tmp_path / "recall.json").read_text())["runs"]
    assert sorted(r["lr"] for r in runs) == [1e-3, 3e-3]
    assert all(r["mixer"] == "no_such_mixer" and "no_such_mixer" in r["error"] for r in runs)
