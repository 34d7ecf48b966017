"""The chunked gated delta rule in Pallas Triton (GPU): forward, backward and the decoding
step.

Triton is the backend because the chunked linear-attention engine that auto dispatch uses
on Hopper is the Pallas Triton one (``seqmix.kernels.linear_attention.triton``); the
Mosaic GPU engine is an explicit implementation only until it is measured. The delta rule
differs from linear attention only by the intra-chunk WY transform that turns
``(k, v, beta)`` into ``w``, ``u`` and by the pseudo-values ``v_new = u - w S`` formed
inside the state pass, so this package reuses that engine's output kernel and its dq/dk
kernel on ``(q, k, v_new)`` unchanged (the sharing of flash-linear-attention's
``chunk_h`` / ``chunk_o``) and adds:

  ``wy.py``     the WY transform per chunk (``delta_rule.chunk``) and its gradient;
  ``state.py``  the state pass that forms ``v_new`` and the reverse pass for the state
                gradients and ``dv_new``;
  ``ops.py``    padding and the custom VJP;
  ``step.py``   the one-token decoding step.

q/k heads are never repeated: a v head reads its q/k head through the block index maps and
dq / dk are summed over each group. Measured speed: BENCHMARKS.md (gated_delta_rule).
"""

from seqmix.kernels.delta_rule.triton.ops import gated_delta_rule
from seqmix.kernels.delta_rule.triton.step import gated_delta_rule_step

__all__ = ["gated_delta_rule", "gated_delta_rule_step"]
