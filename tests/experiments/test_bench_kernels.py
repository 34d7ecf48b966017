"""bench_kernels keeps what it measured when a time limit interrupts it."""

import json

from absl import flags

from experiments import bench_kernels
from experiments.bench import common, steps


def test_an_interrupted_run_writes_the_rows_measured_so_far(tmp_path, monkeypatch):
    def run(op, quick, ceilings):
        rows = common.new_rows()
        rows.append({"label": "first", "impl": "xla", "us": 1.0})
        rows.append({"label": "second", "impl": "xla", "us": 2.0})
        raise KeyboardInterrupt  # what `timeout -s INT` raises in the main thread

    monkeypatch.setattr(steps, "run", run)
    monkeypatch.setattr(common, "matmul_ceiling", lambda: 1.0)
    monkeypatch.setattr(common, "copy_ceiling", lambda: 1.0)
    monkeypatch.setenv("OUT", "")
    monkeypatch.setattr(common, "_LIVE", [])
    flags.FLAGS(["bench_kernels", "--op=causal_conv1d_step", f"--out_dir={tmp_path}"])
    try:
        bench_kernels.main([])
    finally:
        flags.FLAGS.unparse_flags()
    (path,) = tmp_path.glob("causal_conv1d_step_*.json")
    payload = json.loads(path.read_text())
    assert [r["label"] for r in payload["rows"]] == ["first", "second"]
    assert payload["ceilings"]["interrupted"] is True
