"""check_paths: a model's loss and gradients through a kernel path against XLA's."""

import os
import subprocess
import sys

import numpy as np
import pytest

from seqmix.configs import recall
from seqmix.experiments import check_paths


def test_compare_reports_the_loss_difference_and_relative_gradient_errors():
    reference = (1.0, {"a": np.ones(4, np.float32), "b": np.full(4, 2.0, np.float32)})
    other = (1.5, {"a": np.ones(4, np.float32) * 1.1, "b": np.full(4, 2.0, np.float32)})
    result = check_paths.compare(reference, other)
    assert result["loss_diff"] == pytest.approx(0.5)
    assert result["median"] == pytest.approx(0.05)  # errors 0.1 and 0
    assert result["largest"][0] == ("a", pytest.approx(0.1))


def test_the_triton_path_of_a_recall_model_matches_xla_in_float32():
    config = recall.get_config("mixer=gla,d_model=64,seq_len=32,num_kv_pairs=4,batch_size=2")
    xla = check_paths.gradients(config, {"linear_attention": "xla"}, "float32")
    triton = check_paths.gradients(config, {"linear_attention": "pallas_triton"}, "float32")
    assert len(xla[1]) > 10 and set(xla[1]) == set(triton[1])
    result = check_paths.compare(xla, triton)
    assert result["loss_diff"] < 1e-4 and result["largest"][0][1] < 1e-3, result


def test_a_bad_implementation_names_the_flag():
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "seqmix.experiments.check_paths",
            "--config=recall",
            "--implementation=no_such_kernel",
        ],
        env=dict(os.environ),
        capture_output=True,
        text=True,
    )
    assert out.returncode != 0 and "--implementation" in out.stderr, out.stderr[-500:]
