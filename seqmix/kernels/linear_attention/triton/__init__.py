"""Chunked gated linear attention in Pallas Triton (GPU): forward, backward and the
decoding step.

``S_t = exp(g_t) * S_{t-1} + k_t v_t^T``, ``o_t = scale * q_t^T S_t`` (see ``reference.py``
for the argument conventions) in the three stages of the chunked form:

  1+2. ``state.chunk_states``: one sequential pass over chunks per (batch, v head, key
       block, value block) keeping the state in registers; writes the state entering every
       chunk (stages 1 and 2 fused, as flash-linear-attention's ``chunk_fwd_h``); with the
       two-level pass (``plan.py``) the chunks split into segments walked in parallel;
  3.   ``forward.chunk_output``: every chunk's output in parallel (state term plus the
       causal intra-chunk attention with decay ``exp(b_t - b_s)``).

The backward (``ops.py``) recomputes the chunk states, runs the reverse pass for the state
gradients and the per-chunk gradient kernels (``backward.py``). q/k heads are never
repeated: a v head ``h`` reads q/k head ``h // (Hv // Hqk)`` through the block index maps;
dq and dk are computed per v head and summed over each group. ``step.py`` is the one-token
decoding step. Measured speed: BENCHMARKS.md (linear_attention, linear_attention_step).
"""

from seqmix.kernels.linear_attention.triton.ops import linear_attention
from seqmix.kernels.linear_attention.triton.step import linear_attention_step

__all__ = ["linear_attention", "linear_attention_step"]
