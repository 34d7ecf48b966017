"""linear_attention_step: T decoding steps of every implementation give the outputs and final
state of the full op's float32 oracle (no decay, scalar and per-channel decay, groups,
normalize), in interpret mode on the CPU and natively with ``pytest -m gpu``."""

import pytest

from .. import harness
from .cases import STEP_CASES, STEP_GPU_IMPLEMENTATIONS, TPU, check_step


@pytest.mark.parametrize(
    "case, implementation", harness.params(STEP_CASES, STEP_GPU_IMPLEMENTATIONS)
)
def test_steps_equal_the_full_op(case, implementation, capsys):
    check_step(case, implementation)
    if implementation == TPU:
        harness.assert_no_races()
    assert "RACE DETECTED" not in capsys.readouterr().out
