"""gated_delta_rule: every implementation against the float32 oracle on the one case table
(outputs, final states and every gradient), in interpret mode on the CPU and natively with
``pytest -m gpu``."""

import pytest

from .. import harness
from .cases import CASES, GPU_IMPLEMENTATIONS, TPU, check


@pytest.mark.parametrize("case, implementation", harness.params(CASES, GPU_IMPLEMENTATIONS))
def test_matches_the_oracle(case, implementation, capsys):
    check(case, implementation)
    if implementation == TPU:
        harness.assert_no_races()  # the last kernel run: the backward
    assert "RACE DETECTED" not in capsys.readouterr().out
