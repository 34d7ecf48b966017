"""The recall sweep's bookkeeping: resuming across device calls and the per-run deadline."""

import json
import time

from experiments import recall_sweep


def _run(mixer, d, T, n, lr, **extra):
    return dict(mixer=mixer, d_model=d, seq_len=T, num_kv_pairs=n, lr=lr, accuracy=0.5,
                steps=10, **extra)


def test_resume_keeps_finished_runs_and_reruns_the_rest(tmp_path):
    lrs = [1e-3, 3e-3]
    earlier = [
        _run("attention", 64, 64, 4, 1e-3), _run("attention", 64, 64, 4, 3e-3),  # done
        _run("gla", 64, 64, 4, 1e-3),  # one rate missing: rerun, its row dropped
        _run("based", 64, 64, 4, 1e-3, cut=True), _run("based", 64, 64, 4, 3e-3),  # cut
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
    rows = recall_sweep.run_job("attention", 64, 64, 4, [1e-3, 3e-3], steps=500, batch_size=4,
                                seed=0, deadline=past)
    # the deadline had passed: one rate ran to its first evaluation, the other never started
    assert len(rows) == 1
    assert rows[0]["cut"] and rows[0]["steps"] == 250
    assert 0.0 <= rows[0]["accuracy"] <= 1.0 and rows[0]["state_size"] > 0
