"""Mamba-1's selective scan in Pallas Triton (GPU), forward and backward, as a chunked
two-level scan.

Computes, as ``reference.selective_scan_naive`` (shapes and dtypes there)::

    dt_t = softplus(delta_t + delta_bias)          (or delta_t + delta_bias)
    h_t  = exp(dt_t A) * h_{t-1} + dt_t B_t u_t    h: [Dm, N] per batch row, float32
    y_t  = (C_t . h_t + D u_t) * silu(z_t)

One program per (batch row, ``block_d`` channels of one group) walks time in chunks of K
steps. Level one, inside a chunk: the ``(decay, input)`` pairs of K steps, N states and
``block_d`` channels are one register tile, combined by a parallel associative scan along
time (Triton's ``tt.scan``, ``associative.py``), so the chunk's K steps cost a
``log K``-deep tree instead of K dependent steps. Level two, across chunks: the state at the
chunk's end is carried to the next (``forward.py``). Discretisation (bias, softplus), the D
skip and the z gate are fused, and nothing of size ``[B, T, Dm, N]`` touches memory. The
training forward saves the state at each chunk start; the backward (``backward.py``)
recomputes each chunk's states from it and runs the adjoint as a reverse scan.
``TritonConfig(algorithm="lanes")`` runs the training path (the forward that saves states,
and the backward) on the earlier one-channel-per-lane kernels instead (``lanes.py``); the
primal-only call runs the chunked forward either way.

Why Triton, not Mosaic GPU: the scan is elementwise work and tree shuffles, with no matrix
product for Hopper's wgmma to take; Triton's scan lowering and its per-thread layouts of
3D tiles serve it directly, where Mosaic GPU would need the warp-level scan written by hand.
Measured speed: BENCHMARKS.md (selective_scan).
"""

from seqmix.kernels.selective_scan.triton.ops import selective_scan

__all__ = ["selective_scan"]
