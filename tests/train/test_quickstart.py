"""README's quick start, run as written: train, kill, resume, generate, restore in Python.

The commands are read from README.md (the blocks after ``<!-- quick-start -->`` and
``<!-- quick-start-python -->``) and run from a directory outside the checkout, with HOME in
a temporary directory (so ``~/seqmix-runs/...`` lands there). Every ``seqmix-train`` command
gets the same overrides appended (``--config.<key>=<value>``, as the README says any key
takes) that shrink the model and the run to seconds. The first training is killed with
SIGKILL as soon as its first checkpoint is complete, as the README's comment line says.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[2]
SHRINK = [
    "--config.model.d_model=16",
    "--config.model.mixers.mamba2.headdim=8",
    "--config.model.mixers.mamba2.d_state=8",
    "--config.model.mixers.attention.num_heads=2",
    "--config.data.seq_len=32",
    "--config.data.num_eval_batches=1",
    "--config.train.batch_size=4",
    "--config.train.num_steps=40",
    "--config.train.checkpoint_every=2",
    "--config.train.eval_every=20",
    "--config.optimizer.warmup_steps=2",
]
COMMANDS = {
    "seqmix-train": "seqmix.experiments.train",
    "seqmix-generate": "seqmix.experiments.generate",
}


def block(marker: str) -> str:
    """The fenced block after ``<!-- marker -->`` in README.md."""
    text = (REPO / "README.md").read_text()
    after = text.split(f"<!-- {marker} -->", 1)[1]
    return after.split("```", 2)[1].split("\n", 1)[1]


def environment(tmp_path) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", HOME=str(tmp_path / "home"))
    env.pop("SEQMIX_RUNS", None)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    bin_dir = tmp_path / "bin"  # the commands, where this checkout is not installed
    bin_dir.mkdir()
    for name, module in COMMANDS.items():
        if shutil.which(name) is None:
            script = bin_dir / name
            script.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m {module} "$@"\n')
            script.chmod(0o755)
    env["PATH"] = os.pathsep.join([str(bin_dir), env["PATH"]])
    return env


def test_the_readme_quick_start_runs_as_written(tmp_path):
    lines = [ln for ln in block("quick-start").splitlines() if ln.strip()]
    commands = [ln for ln in lines if not ln.startswith("#")]
    assert [c.split()[0] for c in commands] == ["seqmix-train", "seqmix-train", "seqmix-generate"]
    assert commands[0] == commands[1]  # resuming is running the same command again
    assert any(ln.startswith("#") and "kill" in ln for ln in lines)
    env = environment(tmp_path)
    here = tmp_path / "anywhere"
    here.mkdir()
    train = commands[0] + " " + " ".join(SHRINK)
    workdir = tmp_path / "home" / "seqmix-runs" / "bytes"

    # 1. train, then kill -9 once a checkpoint is complete
    proc = subprocess.Popen(
        ["bash", "-c", train],
        cwd=here,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.time() + 300
    saved = []
    while proc.poll() is None and time.time() < deadline and not saved:
        ckpt = workdir / "checkpoints"
        saved = [p for p in os.listdir(ckpt) if p.isdigit()] if ckpt.is_dir() else []
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert saved, "no checkpoint before the deadline"
    assert proc.returncode == -signal.SIGKILL  # killed, not finished

    # 2. the same command resumes and finishes
    out = subprocess.run(
        ["bash", "-c", train], cwd=here, env=env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert "resumed from step" in out.stderr
    assert "FINAL eval at step 40: bits_per_byte = " in out.stdout
    assert "layer 0 (mamba2) mixer" in out.stderr and "ms/step" in out.stderr

    # 3. generate prints text
    gen = subprocess.run(
        ["bash", "-c", commands[2]], cwd=here, env=env, capture_output=True, text=True, timeout=600
    )
    assert gen.returncode == 0, gen.stderr[-3000:]
    assert gen.stdout.startswith("def ") and len(gen.stdout) > 100

    # 4. restore -> generate -> decode in Python
    py = subprocess.run(
        [sys.executable, "-c", block("quick-start-python")],
        cwd=here,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert py.returncode == 0, py.stderr[-3000:]
    assert py.stdout.startswith("class ") and len(py.stdout) > 50

    assert list(here.iterdir()) == []  # nothing written where the commands ran
