"""Short causal depthwise convolution as Pallas Mosaic TPU kernels: forward, backward
(``forward.py``, ``backward.py``, wired in ``ops.py``) and the one-token step for decoding
(``step.py``).

Computes, as ``reference.causal_conv1d_naive`` (shapes and dtypes there)::

    y[t] = act(bias + sum_j weight[j] * xp[t + j]),   xp = [initial_state; x]  (W - 1 rows)

Tiles are ``[block_t, block_c]`` (time on sublanes, channels on lanes). The W - 1 row
history of a tile comes from a second, ``halo``-row block of the same input just before it
(the initial state, zero-padded to ``halo`` rows, for the first tile), so tiles are
independent. Inside, the tile and its halo are converted once to a float32 VMEM scratch and
the W taps are static sublane-offset reads of it.

Backward: ``dpre = dy * act'(pre)`` over the tile plus ``halo`` rows after it (their inputs
from the next tile's first rows), then ``dx[s] = sum_j weight[j] dpre[s + W - 1 - j]``,
per-tile partial sums of dweight and dbias (reduced in XLA), and d initial_state from the
first tile.
"""

from seqmix.kernels.conv1d.tpu.ops import causal_conv1d
from seqmix.kernels.conv1d.tpu.step import causal_conv1d_step

__all__ = ["causal_conv1d", "causal_conv1d_step"]
