"""causal_conv1d: every implementation against the float32 oracle on the one case table (y,
the final state and every gradient), in interpret mode on the CPU and natively with
``pytest -m gpu``."""

import pytest

from .. import harness
from .cases import CASES, GPU_IMPLEMENTATIONS, check


@pytest.mark.parametrize("case, implementation", harness.params(CASES, GPU_IMPLEMENTATIONS))
def test_matches_the_oracle(case, implementation, capsys):
    check(case, implementation)
    assert "RACE DETECTED" not in capsys.readouterr().out  # the TPU interpreter's detector
