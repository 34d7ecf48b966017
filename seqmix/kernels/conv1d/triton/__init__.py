"""Short causal depthwise convolution as Pallas Triton kernels (GPU): forward, backward
(``forward.py``, ``backward.py``, wired in ``ops.py``) and the one-token step for decoding
(``step.py``).

Computes, as ``reference.causal_conv1d_naive`` (shapes and dtypes there)::

    y[t] = act(bias + sum_j weight[j] * xp[t + j]),   xp = [initial_state; x]  (W - 1 rows)

One program per (batch row, block of ``block_c`` channels, segment of ``seg`` steps). It
walks its segment row by row (``unroll`` rows per loop iteration, their loads issued
together) and keeps the last W - 1 input rows in registers, so every input row is read
once plus a W - 1 row halo per segment; accumulation is float32.

The backward walks the same way: ``dpre[t] = dy[t] * act'(pre[t])`` with ``pre[t]``
recomputed from the register window, ``dx[s] = sum_j weight[j] dpre[s + W - 1 - j]``
emitted W - 1 steps later from a window of dpre rows (the first segment also emits
d initial_state), and per-segment partial sums of dweight and dbias that XLA reduces.
Measured speed: BENCHMARKS.md (causal_conv1d, causal_conv1d_step).
"""

from seqmix.kernels.conv1d.triton.ops import causal_conv1d
from seqmix.kernels.conv1d.triton.step import causal_conv1d_step

__all__ = ["causal_conv1d", "causal_conv1d_step"]
