"""Fault tolerance: SIGKILL and SIGTERM mid-run, corrupt checkpoints, non-finite losses.

A resumed run must end bit-identical (on CPU) to one that was never interrupted: batches and
dropout keys are pure functions of (seed, step) and the checkpoint holds the whole state.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from train_helpers import assert_identical, checkpoint_arrays, tiny_config

from seqmix import data as data_lib
from seqmix.train import loop, read_metrics, train_and_evaluate

HELPER = str(pathlib.Path(__file__).with_name("train_helpers.py"))
REPO = str(pathlib.Path(__file__).parents[2])
NUM_STEPS = 12


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run: its final checkpoint (step 12)."""
    workdir = str(tmp_path_factory.mktemp("reference"))
    result = train_and_evaluate(tiny_config(), workdir)
    assert result["step"] == NUM_STEPS and result["stopped_by"] is None
    return checkpoint_arrays(workdir, NUM_STEPS)


def _run_subprocess(config, workdir, *flags, timeout=240):
    path = os.path.join(workdir, "config-in.json")
    os.makedirs(workdir, exist_ok=True)
    with open(path, "w") as f:
        f.write(config.to_json())
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, HELPER, path, workdir, *map(str, flags)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def test_sigkill_then_resume_is_bit_identical(tmp_path, reference):
    workdir = str(tmp_path / "run")
    # Killed while the checkpoint of step 8 may still be being written (async save).
    proc = _run_subprocess(tiny_config(), workdir, "--sigkill-at", 9)
    assert proc.returncode == -9, proc.stderr[-3000:]
    steps = sorted(int(p) for p in os.listdir(os.path.join(workdir, "checkpoints")) if p.isdigit())
    assert steps and max(steps) <= 8 and NUM_STEPS not in steps
    result = train_and_evaluate(tiny_config(), workdir)
    assert result["step"] == NUM_STEPS
    assert_identical(checkpoint_arrays(workdir, NUM_STEPS), reference)


def test_sigterm_saves_and_resumes(tmp_path, reference):
    workdir = str(tmp_path / "run")
    proc = _run_subprocess(tiny_config(), workdir, "--sigterm-at", 5)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT ")[-1])
    assert result["stopped_by"] == "SIGTERM"
    stopped = result["step"]
    assert 5 <= stopped < NUM_STEPS and stopped % 4  # saved at the signal, not a periodic step
    assert stopped in [
        int(p) for p in os.listdir(os.path.join(workdir, "checkpoints")) if p.isdigit()
    ]
    result = train_and_evaluate(tiny_config(), workdir)
    logged = [r["step"] for r in read_metrics(workdir, "train")]
    assert result["step"] == NUM_STEPS and logged == list(range(1, NUM_STEPS + 1))
    assert_identical(checkpoint_arrays(workdir, NUM_STEPS), reference)


def test_corrupt_newest_checkpoint_is_skipped(tmp_path, reference, caplog):
    workdir = str(tmp_path / "run")
    _train_until(workdir, 8)
    newest = pathlib.Path(workdir, "checkpoints", "8")
    for path in (newest / "params").rglob("*"):
        if path.is_file():
            path.write_bytes(b"not a checkpoint")
    with caplog.at_level(logging.WARNING):
        result = train_and_evaluate(tiny_config(), workdir)
    assert any(
        "could not be restored" in r.getMessage() and "8" in r.getMessage() for r in caplog.records
    ), [r.getMessage() for r in caplog.records]
    assert result["step"] == NUM_STEPS
    assert os.listdir(os.path.join(workdir, "corrupt_checkpoints"))  # set aside, not deleted
    # Resumed from step 4 and still identical to the uninterrupted run.
    assert_identical(checkpoint_arrays(workdir, NUM_STEPS), reference)


def _stop_after(step):
    def fn(s, metrics):
        del metrics
        if s == step:
            raise KeyboardInterrupt

    return fn


def _train_until(workdir: str, step: int) -> None:
    """Runs the 12-step config and interrupts it (KeyboardInterrupt) once ``step``'s
    checkpoint has been started; pending saves still complete."""
    with pytest.raises(KeyboardInterrupt):
        train_and_evaluate(tiny_config(), workdir, callbacks=[_stop_after(step + 1)])


def test_a_temporary_checkpoint_directory_is_never_latest(tmp_path):
    workdir = str(tmp_path / "run")
    _train_until(workdir, 4)
    ckpt = pathlib.Path(workdir, "checkpoints")
    # What an interrupted asynchronous save leaves behind.
    half = ckpt / "10.orbax-checkpoint-tmp-123"
    (half / "params").mkdir(parents=True)
    (half / "params" / "junk").write_bytes(b"half written")
    model, _ = loop.restore_model(workdir)
    from seqmix.train.checkpoint import Checkpoints

    assert Checkpoints(str(ckpt), read_only=True).all_steps() == [4]
    assert model is not None


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(
    tmp_path, monkeypatch
):
    make_task = data_lib.make_task

    def poisoned(config):  # step >= 6 gets a NaN loss weight, as from a corrupt batch
        task = make_task(config)

        def batch(stream, index, batch_size):
            b = task.batch(stream, index, batch_size)
            if stream == data_lib.TRAIN_STREAM and index >= 6:
                b["mask"] = np.full_like(b["mask"], np.nan)
            return b

        return dataclasses.replace(task, batch=batch)

    monkeypatch.setattr(loop.data_lib, "make_task", poisoned)
    workdir = str(tmp_path / "run")
    with pytest.raises(FloatingPointError, match=r"step 6: the loss is nan.*checkpoint is step 4"):
        train_and_evaluate(tiny_config(), workdir)
    steps = sorted(int(p) for p in os.listdir(os.path.join(workdir, "checkpoints")) if p.isdigit())
    assert steps == [4]
    arrays = checkpoint_arrays(workdir, 4)
    assert all(np.isfinite(a).all() for a in arrays.values() if a.dtype.kind == "f")


def test_the_best_checkpoint_survives_a_resume(tmp_path):
    # The ranking metrics must be on disk: a new manager (a resumed run) that knew them only
    # from memory would rank the old steps as metric-less and delete the best one.
    import jax.numpy as jnp

    from seqmix.train.checkpoint import Checkpoints

    items = {"params": {"w": jnp.ones(3)}, "train": {"step": jnp.zeros(())}}
    first = Checkpoints(str(tmp_path), keep=1, metric="accuracy", async_save=False)
    first.save(1, items, {"accuracy": 0.9})
    first.save(2, items, {"accuracy": 0.1})
    first.save(3, items)  # no evaluation at this step
    assert first.all_steps() == [1, 3]
    first.manager.close()
    resumed = Checkpoints(str(tmp_path), keep=1, metric="accuracy", async_save=False)
    resumed.save(4, items, {"accuracy": 0.2})
    assert resumed.all_steps() == [1, 4]
    resumed.manager.close()
