"""decay_at_init: the decays a model's mixers compute at initialisation, on one batch."""

import math
import os
import subprocess
import sys

import numpy as np
import pytest

from seqmix.configs import recall
from seqmix.experiments import decay_at_init
from seqmix.layers import linear_attention


def test_records_each_gated_layer_with_its_gate():
    config = recall.get_config("mixer=gla,d_model=64,seq_len=32,num_kv_pairs=4,batch_size=2")
    records = decay_at_init.decays(config)
    assert [r["layer"] for r in records] == ["GLA", "GLA"]  # one per layer, in order
    for r in records:
        # GLA's gate: logsigmoid(logits) / 16 per key channel of each head, all < 0
        assert r["per_unit"].shape == (64,) and np.all(r["per_unit"] < 0)
        assert r["mean"] == pytest.approx(float(np.mean(r["per_unit"])))
        assert -math.log(2) / 16 * 3 < r["mean"] < 0  # logits near 0 at init: near log(2) / 16
    # the layers' method is restored after the run
    assert linear_attention.LinearAttention._log_decay.__name__ == "_log_decay"


def test_retention_is_the_decay_compounded_over_the_gap():
    median, largest = decay_at_init.retention([-0.1, -0.2, -0.05], 10)
    assert median == pytest.approx(math.exp(-1.0)) and largest == pytest.approx(math.exp(-0.5))


def test_a_model_without_a_gated_mixer_is_refused():
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "seqmix.experiments.decay_at_init",
            "--config=recall:mixer=deltanet,d_model=64,seq_len=32,num_kv_pairs=4,batch_size=2",
        ],
        env=dict(os.environ),
        capture_output=True,
        text=True,
    )
    assert out.returncode != 0 and "data-dependent decay" in out.stderr, out.stderr[-500:]
