"""The gated delta rule (Gated DeltaNet; DeltaNet with no decay): chunked op and decoding step."""

from seqmix.kernels.delta_rule.api import gated_delta_rule, gated_delta_rule_step

__all__ = ["gated_delta_rule", "gated_delta_rule_step"]
