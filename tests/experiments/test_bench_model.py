"""bench_model end to end at toy size on the CPU, in a subprocess (absl flags are global):
models from the training configs, float32 on a CPU, results outside the checkout, no
matplotlib needed."""

import json
import os
import pathlib
import subprocess
import sys

from seqmix.configs import loader
from seqmix.train import build_program

REPO = pathlib.Path(__file__).parents[2]
# the recall preset shrunk to CPU size by overrides of the training config
TOY_RECALL = [
    "--preset=recall",
    "--lengths=32",
    "--config.model.d_model=16",
    "--config.model.vocab_size=64",
    "--config.data.vocab_size=64",
    "--config.data.num_kv_pairs=4",
    "--config.train.batch_size=4",
    "--config.data.num_eval_batches=1",
]


def _run(tmp_path, *flags, without_matplotlib=False):
    env = dict(os.environ, JAX_PLATFORMS="cpu", SEQMIX_RUNS=str(tmp_path / "runs"), OUT="")
    paths = [str(REPO)]
    if without_matplotlib:  # a package that fails to import, found first
        fake = tmp_path / "no_matplotlib" / "matplotlib"
        fake.mkdir(parents=True)
        (fake / "__init__.py").write_text("raise ImportError('matplotlib is not installed')\n")
        paths.insert(0, str(fake.parent))
    env["PYTHONPATH"] = os.pathsep.join(paths + [env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-m", "seqmix.experiments.bench_model", *flags],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def test_recall_preset_times_a_train_step_per_mixer_with_the_ratio_to_attention(tmp_path):
    proc = _run(tmp_path, *TOY_RECALL, "--mixers=attention,gla", without_matplotlib=True)
    (path,) = (tmp_path / "runs" / "bench_model").glob("model_recall_*.json")  # outside REPO
    rows = json.loads(path.read_text())["rows"]
    assert [(r["mixer"], r["T"]) for r in rows] == [("attention", 32), ("gla", 32)]
    for r in rows:
        assert "error" not in r, r
        assert r["compute_dtype"] == "float32"  # the config says bfloat16; a CPU gets float32
        assert r["step_ms"] > 0 and r["batch"] == 4 and 0 < r["loss"] < 10
        # the model of the training config: the same parameter count as seqmix-train's
        config = loader.apply_overrides(
            loader.load(f"recall:d_model=256,seq_len=256,num_kv_pairs=16,mixer={r['mixer']}"),
            [a[len("--config.") :] for a in TOY_RECALL if a.startswith("--config.")],
        )
        assert r["params"] == build_program(config).num_params
        assert r["command"].startswith("seqmix-train --config=recall:")
    assert rows[0]["vs_attention"] == 1.0 and rows[1]["vs_attention"] > 0
    assert "matplotlib is not installed: no plot" in proc.stdout
    assert "| gla | 32 |" in proc.stdout  # the table, a row per mixer


def test_lm_preset_over_lengths_from_another_config(tmp_path):
    _run(
        tmp_path,
        "--config=lm_bytes:layers=2,d_model=32",
        "--config.model.vocab_size=64",
        f"--config.data.data_dir={tmp_path / 'data'}",
        "--mixers=attention,hybrid",
        "--lengths=32,64",
        "--tokens=128",
    )
    (path,) = (tmp_path / "runs" / "bench_model").glob("model_lm_*.json")
    rows = json.loads(path.read_text())["rows"]
    assert [(r["mixer"], r["T"], r["batch"]) for r in rows] == [
        ("attention", 32, 4),
        ("attention", 64, 2),
        ("hybrid", 32, 4),
        ("hybrid", 64, 2),
    ]
    assert all("error" not in r and r["step_ms"] > 0 for r in rows)


def test_configurations_not_compiled_within_the_budget_are_reported(tmp_path):
    _run(
        tmp_path,
        *TOY_RECALL,
        "--mixers=attention",
        "--compile_workers=1",
        "--compile_budget_s=0.5",
    )
    (path,) = (tmp_path / "runs" / "bench_model").glob("model_recall_*.json")
    rows = json.loads(path.read_text())["rows"]
    assert rows == [
        {"mixer": "attention", "T": 32, "error": "not compiled within --compile_budget_s=0.5"}
    ]
