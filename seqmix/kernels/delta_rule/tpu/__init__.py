"""The gated delta rule as Pallas TPU kernels: the WY transform of every chunk (forward and
backward kernels) with the state and output passes in XLA (``ops.py``), and the decoding
step (``step.py``)."""

from seqmix.kernels.delta_rule.tpu.ops import gated_delta_rule
from seqmix.kernels.delta_rule.tpu.step import gated_delta_rule_step

__all__ = ["gated_delta_rule", "gated_delta_rule_step"]
