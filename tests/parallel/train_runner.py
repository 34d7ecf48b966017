"""Run by the sequence-parallel training test in a subprocess with 8 CPU devices:

    python tests/parallel/train_runner.py WORKDIR

Trains MQAR and the byte LM (small variants of their configs, the same seed) with
``python -m seqmix.experiments.train`` once with ``--config.mesh.seq=1`` and once with
``--config.mesh.seq=4``, and prints one JSON line ``RESULT {name: {seq: [loss per step]}}``
read from each run's ``metrics.jsonl``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

RUNS = {
    "mqar": [
        "--config=seqmix/configs/mqar.py:steps=3,batch_size=8,seq_len=64,d_model=32",
        "--config.data.num_eval_batches=1",
    ],
    "lm_bytes": [
        "--config=seqmix/configs/lm_bytes.py:steps=3,batch_size=8,seq_len=64,d_model=32,layers=2",
        "--config.data.num_eval_batches=1",
    ],
}
COMMON = [
    "--config.optimizer.warmup_steps=1",
    "--config.train.log_every=1",
    "--config.train.eval_every=0",
    "--config.train.checkpoint_every=0",
    "--config.train.async_checkpoints=False",
]


def losses(workdir: str) -> list[float]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [r["loss"] for r in rows if r["split"] == "train"]


def main(root: str) -> None:
    out = {}
    for name, args in RUNS.items():
        out[name] = {}
        for seq in (1, 4):
            workdir = os.path.join(root, f"{name}-seq{seq}")
            cmd = [sys.executable, "-m", "seqmix.experiments.train", *args, *COMMON]
            cmd += [f"--config.mesh.seq={seq}", f"--workdir={workdir}"]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            if proc.returncode:
                raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
            out[name][str(seq)] = losses(workdir)
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
