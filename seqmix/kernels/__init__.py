"""seqmix's sequence-mixing ops: pure array functions, one folder per op family.

Every op takes ``implementation=`` (see ``seqmix.kernels.dispatch``); layout is
``[batch, time, heads, head_dim]`` throughout.
"""

from seqmix.kernels.attention import attention, decode_attention
from seqmix.kernels.conv1d import causal_conv1d, causal_conv1d_step
from seqmix.kernels.delta_rule import gated_delta_rule, gated_delta_rule_step
from seqmix.kernels.dispatch import IMPLEMENTATIONS, interpret, interpret_mode
from seqmix.kernels.linear_attention import linear_attention, linear_attention_step
from seqmix.kernels.selective_scan import selective_scan

__all__ = [
    "IMPLEMENTATIONS",
    "attention",
    "causal_conv1d",
    "causal_conv1d_step",
    "decode_attention",
    "gated_delta_rule",
    "gated_delta_rule_step",
    "interpret",
    "interpret_mode",
    "linear_attention",
    "linear_attention_step",
    "selective_scan",
]
