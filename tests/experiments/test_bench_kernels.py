"""bench_kernels keeps what it measured when a time limit interrupts it."""

import json
import types

from seqmix.experiments.bench import common


def test_an_interrupted_run_writes_the_rows_measured_so_far(tmp_path, monkeypatch):
    def run(quick, ceilings):
        rows = common.new_rows()
        rows.append({"label": "first", "impl": "xla", "us": 1.0})
        rows.append({"label": "second", "impl": "xla", "us": 2.0})
        raise KeyboardInterrupt  # what `timeout -s INT` raises in the main thread

    monkeypatch.setenv("OUT", "")
    monkeypatch.setattr(common, "_LIVE", [])
    rows, columns, path = common.run_op(
        types.SimpleNamespace(run=run),
        "causal_conv1d_step",
        False,
        {"copy_tbps": 1.0},
        str(tmp_path),
    )
    with open(path) as f:
        payload = json.load(f)
    labels = [r["label"] for r in payload["rows"]]
    assert labels == ["first", "second"] == [r["label"] for r in rows]
    assert payload["ceilings"]["interrupted"] is True and "us" in columns
