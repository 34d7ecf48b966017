"""A run directory never loses or mixes a user's runs.

A second run with another config is refused (naming the keys) and changes nothing on disk,
unless it asks for a fine-tune or a fresh start, which the history records; a checkpoint
that cannot be written stops the run at once with a clear error; a metrics log cut by a
crash is repaired; a kill during a save loses nothing; restore_model says what is wrong.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import pytest
from train_helpers import assert_identical, checkpoint_arrays, tiny_config

from seqmix.train import (
    CheckpointMismatchError,
    ConfigMismatchError,
    load_config,
    read_metrics,
    restore_model,
    train_and_evaluate,
)

HELPER = str(pathlib.Path(__file__).with_name("train_helpers.py"))
REPO = str(pathlib.Path(__file__).parents[2])
NUM_STEPS = 12


def snapshot(root) -> dict:
    """Every file and directory under ``root``: content hash, size and modification time."""
    out = {}
    for path in sorted(pathlib.Path(root).rglob("*")):
        stat = path.stat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
        out[str(path.relative_to(root))] = (digest, stat.st_size, stat.st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run: its final checkpoint (step 12)."""
    workdir = str(tmp_path_factory.mktemp("reference"))
    result = train_and_evaluate(tiny_config(), workdir)
    assert result["step"] == NUM_STEPS and result["stopped_by"] is None
    return checkpoint_arrays(workdir, NUM_STEPS)


@pytest.fixture(scope="module")
def trained_once(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("trained") / "run")
    train_and_evaluate(tiny_config(num_steps=8), workdir)
    return workdir


@pytest.fixture
def trained(trained_once, tmp_path):
    """A finished 8-step run (checkpoints at 4 and 8): a test's own copy of one run."""
    workdir = str(tmp_path / "run")
    shutil.copytree(trained_once, workdir)
    return workdir


def _run_helper(config, workdir, *flags, timeout=240):
    path = os.path.join(os.path.dirname(workdir), f"config-{os.path.basename(workdir)}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(config.to_json())
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    t0 = time.time()
    proc = subprocess.run(
        [sys.executable, HELPER, path, workdir, *map(str, flags)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    return proc, time.time() - t0


def _history(workdir) -> list[dict]:
    text = pathlib.Path(workdir, "config_history.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines()]


# ------------------------------------------------------------------ a differing config


@pytest.mark.parametrize(
    "change, keys",
    [
        (lambda c: setattr(c.model, "d_model", 32), ["model.d_model"]),
        (lambda c: setattr(c.model, "layers", ["attention", "attention"]), ["model.layers"]),
        (
            lambda c: (setattr(c.optimizer, "lr", 2e-2), setattr(c, "seed", 1)),
            ["optimizer.lr", "seed"],
        ),
        (lambda c: setattr(c.data, "num_kv_pairs", 3), ["data.num_kv_pairs"]),
        (lambda c: setattr(c.train, "batch_size", 4), ["train.batch_size"]),
    ],
    ids=["d_model", "layers", "lr_and_seed", "data", "batch"],
)
def test_a_differing_config_is_refused_naming_the_keys_and_nothing_changes(trained, change, keys):
    before = snapshot(trained)
    config = tiny_config(num_steps=8)
    change(config)
    with pytest.raises(ConfigMismatchError) as info:
        train_and_evaluate(config, trained)
    assert sorted(info.value.differences) == sorted(keys)
    for key in keys:
        assert key in str(info.value)
    assert "fine_tune" in str(info.value) and "fresh" in str(info.value)
    assert snapshot(trained) == before  # nothing written, moved or touched
    _, saved = restore_model(trained)  # the recorded run is still whole
    assert saved.model.d_model == 16 and saved.optimizer.lr == 1e-2


def test_keys_that_do_not_change_the_run_resume_and_are_recorded(trained):
    original = pathlib.Path(trained, "config.json").read_text()
    config = tiny_config(num_steps=10, eval_every=5, checkpoint_every=5)
    result = train_and_evaluate(config, trained)
    assert result["event"] == "resume" and result["step"] == 10
    assert pathlib.Path(trained, "config.json").read_text() == original  # never rewritten
    history = _history(trained)
    assert [h["event"] for h in history] == ["new", "resume"]
    assert history[1]["step"] == 8
    assert history[1]["changes"]["train.num_steps"] == [8, 10]
    assert history[1]["changes"]["train.eval_every"] == [0, 5]
    assert load_config(trained).train.num_steps == 10  # the config in force


def test_fine_tune_starts_from_the_checkpoint_and_the_history_says_so(trained):
    original = pathlib.Path(trained, "config.json").read_text()
    start = checkpoint_arrays(trained, 8)
    config = tiny_config(num_steps=4)
    config.optimizer.lr = 3e-3
    config.data.num_kv_pairs = 3
    result = train_and_evaluate(config, trained, on_config_change="fine_tune")
    assert result["event"] == "fine_tune" and result["step"] == 12  # 4 more after step 8
    assert pathlib.Path(trained, "config.json").read_text() == original
    history = _history(trained)
    assert [h["event"] for h in history] == ["new", "fine_tune"]
    assert history[1]["step"] == 8 and history[1]["segment_start"] == 8
    assert history[1]["changes"]["optimizer.lr"] == [1e-2, 3e-3]
    assert history[1]["config"]["data"]["num_kv_pairs"] == 3
    # the old checkpoint is untouched; the new steps follow it, with a fresh schedule
    assert_identical(checkpoint_arrays(trained, 8), start)
    train = read_metrics(trained, "train")
    assert [r["step"] for r in train] == list(range(1, 13))
    assert train[8]["lr"] == 0.0  # step 9: the fine-tune's first step, warmup from zero
    _, saved = restore_model(trained)
    assert saved.optimizer.lr == 3e-3
    # the same command again resumes the fine-tune (the flag changes nothing now)
    again = train_and_evaluate(config, trained, on_config_change="fine_tune")
    assert again["event"] == "resume" and again["step"] == 12


def test_fine_tune_of_another_model_names_the_arrays(trained):
    config = tiny_config(num_steps=4)
    config.model.d_model = 32
    before = snapshot(trained)
    with pytest.raises(CheckpointMismatchError, match=r"backbone/embed/embedding has shape"):
        train_and_evaluate(config, trained, on_config_change="fine_tune")
    after = {k: v for k, v in snapshot(trained).items() if not k.startswith("checkpoints")}
    assert after == {k: v for k, v in before.items() if not k.startswith("checkpoints")}
    assert sorted(os.listdir(os.path.join(trained, "checkpoints"))) == ["4", "8"]


def test_fresh_moves_the_recorded_run_aside_whole(trained):
    old = snapshot(trained)
    config = tiny_config(num_steps=4)
    config.model.d_model = 32
    result = train_and_evaluate(config, trained, on_config_change="fresh")
    assert result["event"] == "fresh" and result["step"] == 4
    previous = pathlib.Path(trained, "previous", "1")
    moved = {k: v[:2] for k, v in snapshot(previous).items()}
    assert moved == {k: v[:2] for k, v in old.items()}  # every file of the old run, unchanged
    assert load_config(str(previous)).model.d_model == 16
    assert load_config(trained).model.d_model == 32
    history = _history(trained)
    assert [h["event"] for h in history] == ["fresh"] and history[0]["previous"] == "previous/1"
    assert [r["step"] for r in read_metrics(trained, "train")] == [1, 2, 3, 4]


# ----------------------------------------------------------- checkpoints that cannot be saved


@pytest.mark.parametrize(
    "fault, flags",
    [
        ("a file where the directory was", ["--break-checkpoints-at", 3]),
        ("writes failing as on a full disk", ["--limit-file-size-at", 1]),
    ],
    ids=["file_for_directory", "full_disk"],
)
def test_a_checkpoint_that_cannot_be_written_stops_the_run_at_once(tmp_path, fault, flags):
    del fault
    workdir = str(tmp_path / "run")
    config = tiny_config(num_steps=400, checkpoint_every=4)
    proc, seconds = _run_helper(config, workdir, *flags, timeout=180)
    assert proc.returncode == 3, proc.stdout[-2000:] + proc.stderr[-3000:]
    message = proc.stdout.split("SAVE FAILED ", 1)[1]
    assert "saving the checkpoint of step 4" in message and "Training stopped" in message
    assert "run the same command again" in message
    logged = [r["step"] for r in read_metrics(workdir, "train")]
    # stopped as soon as the failure was known (steps take milliseconds here; the write
    # fails in a background thread), at the latest when the next save would start
    assert max(logged) <= 8, logged
    assert seconds < 120


def _can_bind_mount(tmp_path) -> bool:
    src, dst = tmp_path / "probe_src", tmp_path / "probe_dst"
    src.mkdir()
    dst.mkdir()
    ok = subprocess.run(["mount", "--bind", str(src), str(dst)], capture_output=True).returncode
    if ok == 0:
        subprocess.run(["umount", str(dst)], capture_output=True)
    return ok == 0


def test_a_read_only_checkpoint_directory_ends_the_launcher_with_an_error(tmp_path):
    """The launcher on a read-only bind mount (where root's writes fail too): a clear error
    and exit status 3 within seconds, never a hang."""
    if sys.platform != "linux" or not _can_bind_mount(tmp_path):
        pytest.skip("needs mount --bind (root on Linux) to make a read-only directory")
    workdir = tmp_path / "run"
    checkpoints, backing = workdir / "checkpoints", tmp_path / "backing"
    checkpoints.mkdir(parents=True)
    backing.mkdir()
    subprocess.run(["mount", "--bind", str(backing), str(checkpoints)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(checkpoints)], check=True)
        env = dict(os.environ, JAX_PLATFORMS="cpu")
        env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
        t0 = time.time()
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "seqmix.experiments.train",
                "--config=mqar:mixer=attention,d_model=16,seq_len=32,num_kv_pairs=4",
                f"--workdir={workdir}",
                "--config.train.num_steps=400",
                "--config.train.checkpoint_every=2",
                "--config.train.batch_size=4",
                "--config.data.num_eval_batches=1",
                "--config.optimizer.warmup_steps=1",
            ],
            capture_output=True,
            text=True,
            timeout=180,
            env=env,
        )
        seconds = time.time() - t0
    finally:
        subprocess.run(["umount", str(checkpoints)], capture_output=True)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "STOPPED: saving the checkpoint of step 2" in proc.stderr
    assert "Read-only file system" in proc.stderr
    assert seconds < 120


# ------------------------------------------------------------------ metrics cut by a crash


def test_a_partial_last_metrics_line_is_cut_on_resume_and_skipped_when_read(tmp_path, caplog):
    workdir = str(tmp_path / "run")
    train_and_evaluate(tiny_config(num_steps=8), workdir)
    path = os.path.join(workdir, "metrics.jsonl")
    with open(path, "a") as f:
        f.write('{"step": 9, "split": "train", "lo')  # a crash in the middle of a write
    with caplog.at_level(logging.WARNING):
        steps = [r["step"] for r in read_metrics(workdir, "train")]
    assert steps == list(range(1, 9))
    assert any("not a whole metrics record" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        train_and_evaluate(tiny_config(num_steps=12), workdir)
    assert any("partial line" in r.getMessage() for r in caplog.records)
    lines = pathlib.Path(path).read_text().splitlines()
    assert all(json.loads(line) for line in lines)  # every line whole again
    assert [r["step"] for r in read_metrics(workdir, "train")] == list(range(1, 13))


# ------------------------------------------------------------------- a kill during a save


def test_a_kill_during_a_save_loses_and_mixes_nothing(tmp_path, reference):
    """SIGKILL while orbax writes a checkpoint (its temporary directory exists): the resumed
    run ends bit-identical to an uninterrupted one, with every metrics step once."""
    workdir = tmp_path / "run"
    config = tiny_config(checkpoint_every=1)
    path = tmp_path / "config.json"
    path.write_text(config.to_json())
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.Popen(
        [sys.executable, HELPER, str(path), str(workdir)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    killed_during = None
    deadline = time.time() + 240
    try:
        while proc.poll() is None and time.time() < deadline:
            ckpt = workdir / "checkpoints"
            names = os.listdir(ckpt) if ckpt.is_dir() else []
            partial = [n for n in names if "orbax-checkpoint-tmp" in n]
            if partial and any(n.isdigit() for n in names):  # a save under way, one done
                os.kill(proc.pid, signal.SIGKILL)
                killed_during = partial[0]
                break
            time.sleep(0.0005)
    finally:
        if proc.poll() is None and killed_during is None:
            proc.kill()
        proc.wait()
    assert killed_during is not None, "no save was caught in progress"
    result = train_and_evaluate(tiny_config(checkpoint_every=1), str(workdir))
    assert result["step"] == NUM_STEPS
    names = os.listdir(workdir / "checkpoints")
    assert not [n for n in names if "orbax-checkpoint-tmp" in n]  # the half save is gone
    assert_identical(checkpoint_arrays(str(workdir), NUM_STEPS), reference)
    assert [r["step"] for r in read_metrics(str(workdir), "train")] == list(range(1, NUM_STEPS + 1))


# ------------------------------------------------------------------- restore_model's errors


def test_restore_model_says_what_is_wrong(tmp_path, trained):
    with pytest.raises(FileNotFoundError, match=r"does not exist"):
        restore_model(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"holds no run: it has no config.json"):
        restore_model(str(tmp_path / "empty"))
    never_saved = tmp_path / "never_saved"
    never_saved.mkdir()
    (never_saved / "config.json").write_text(pathlib.Path(trained, "config.json").read_text())
    with pytest.raises(FileNotFoundError, match=r"has no checkpoint yet"):
        restore_model(str(never_saved))
    with pytest.raises(ValueError, match=r"step=5: no checkpoint at that step .*\[4, 8\]"):
        restore_model(trained, step=5)
    # a config.json edited after the checkpoints were written
    edited = json.loads(pathlib.Path(trained, "config.json").read_text())
    edited["model"]["d_model"] = 32
    pathlib.Path(trained, "config.json").write_text(json.dumps(edited))
    with pytest.raises(CheckpointMismatchError, match=r"step 8 .* another model") as info:
        restore_model(trained)
    assert "backbone/embed/embedding has shape (16, 16) in the checkpoint, (16, 32)" in str(
        info.value
    )
    assert sorted(os.listdir(os.path.join(trained, "checkpoints"))) == ["4", "8"]  # kept
