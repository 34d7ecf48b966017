"""Mamba-1's selective scan as Pallas Mosaic TPU kernels, forward and backward, as a chunked
two-level scan (``forward.py``, ``backward.py``, wired in ``ops.py``; the tiles and the
in-register scan in ``tiles.py``).

Computes, as ``reference.selective_scan_naive`` (shapes and dtypes there)::

    dt_t = softplus(delta_t + delta_bias)          (or delta_t + delta_bias)
    h_t  = exp(dt_t A) * h_{t-1} + dt_t B_t u_t    h: [Dm, N] per batch row, float32
    y_t  = (C_t . h_t + D u_t) * silu(z_t)

Layout: one program per (batch row, ``block_c`` channels of one group on lanes); time is the
last grid axis (``"arbitrary"``) in chunks of ``chunk`` steps on sublanes. Level one, inside
a chunk: per state n the ``(decay, input)`` pairs are ``[chunk, block_c]`` vreg tiles,
combined by a ``log2(chunk)``-step scan along sublanes (rotations and selects, no memory
traffic); B_t[n] and C_t[n] enter as columns broadcast across lanes. Level two: the state at
the chunk's end stays in VMEM scratch for the next grid step. The training forward saves the
state at each chunk start (``[B, T/chunk, N, channels]``); the backward walks the chunks in
reverse, recomputes the chunk's states from it and runs the adjoint as a reverse scan.
dA, dD, d delta_bias and the state adjoint stay in resident output blocks across the chunks;
dB and dC are written per channel block as partial sums that XLA adds over each group.
"""

from seqmix.kernels.selective_scan.tpu.ops import selective_scan

__all__ = ["selective_scan"]
