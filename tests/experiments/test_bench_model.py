"""bench_model end to end at toy size on the CPU, in a subprocess (absl flags are global)."""

import json
import subprocess
import sys

TOY = [
    "--layers=2",
    "--d_model=32",
    "--vocab=64",
    "--lengths=64",
    "--tokens=128",
    "--peak_tflops=1",
]


def _run(tmp_path, *extra):
    out = tmp_path / "out"
    subprocess.run(
        [sys.executable, "-m", "seqmix.experiments.bench_model", *TOY, *extra, f"--out_dir={out}"],
        check=True,
        capture_output=True,
        timeout=600,
    )
    (path,) = out.glob("model_*.json")
    return json.loads(path.read_text())["rows"]


def test_times_every_mixer_with_host_initialised_parameters(tmp_path):
    rows = _run(tmp_path, "--mixers=attention,hybrid")
    assert [(r["mixer"], r["T"]) for r in rows] == [("attention", 64), ("hybrid", 64)]
    for r in rows:
        assert "error" not in r, r
        assert r["step_ms"] > 0 and r["batch"] == 2 and r["params_m"] > 0
        assert 0 < r["loss"] < 10  # a finite cross-entropy over 64 tokens (ln 64 = 4.2)


def test_configurations_not_compiled_within_the_budget_are_reported(tmp_path):
    rows = _run(tmp_path, "--mixers=attention", "--compile_workers=1", "--compile_budget_s=0.5")
    assert rows == [
        {"mixer": "attention", "T": 64, "error": "not compiled within --compile_budget_s=0.5"}
    ]
