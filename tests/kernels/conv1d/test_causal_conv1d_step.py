"""causal_conv1d_step: T decoding steps of every implementation give the outputs and final
state of the full op's float32 oracle, in interpret mode on the CPU and natively with
``pytest -m gpu``."""

import pytest

from .. import harness
from .cases import GPU_IMPLEMENTATIONS, STEP_CASES, check_step


@pytest.mark.parametrize("case, implementation", harness.params(STEP_CASES, GPU_IMPLEMENTATIONS))
def test_steps_equal_the_full_op(case, implementation, capsys):
    check_step(case, implementation)
    assert "RACE DETECTED" not in capsys.readouterr().out
