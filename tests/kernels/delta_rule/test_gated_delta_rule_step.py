"""gated_delta_rule_step: prefill then one step per token of every implementation gives the
outputs and final state of the full op's float32 oracle (decay and none, groups), in
interpret mode on the CPU and natively with ``pytest -m gpu``."""

import pytest

from .. import harness
from .cases import GPU_IMPLEMENTATIONS, STEP_CASES, TPU, check_step


@pytest.mark.parametrize("case, implementation", harness.params(STEP_CASES, GPU_IMPLEMENTATIONS))
def test_steps_equal_the_full_op(case, implementation, capsys):
    check_step(case, implementation)
    if implementation == TPU:
        harness.assert_no_races()
    assert "RACE DETECTED" not in capsys.readouterr().out
