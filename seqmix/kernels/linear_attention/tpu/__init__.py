"""Chunked gated linear attention as Pallas Mosaic TPU kernels: forward, backward
and the decoding step.

Computes (reference.py's contract) ``S_t = exp(g_t) * S_{t-1} + k_t v_t^T`` and
``o_t = scale * q_t^T S_t`` with the state reset wherever the run id changes. The math of
one chunk lives in ``chunk.py``, the kernels in ``forward.py`` and ``backward.py``, their
wiring and the VJP in ``ops.py``, the one-token step in ``step.py``.

Algorithm. The three stages of ``reference.linear_attention_xla`` fuse into one kernel:
the grid is ``(B, Hv, blocks)``, the block axis sequential ('arbitrary'); a block holds
``m`` chunks of ``C`` tokens (about 1024 tokens, so that the ~0.35 us cost of a grid step
is amortised) and the kernel walks them with a ``fori_loop`` while the state ``S [K, V]``
(float32) stays in VMEM scratch across chunks and blocks. With ``b`` the inclusive cumsum of
``g`` inside a chunk (``b <= 0``, non-increasing) and ``b_L`` its last value, per chunk:

    o   = scale * ((q * exp(b)) @ S + (mask(q k^T) * exp(b_t - b_s)) @ v)
    S  <- exp(b_L) * S + (k * exp(b_L - b))^T @ v

Every ``exp`` is of a non-positive number (clamped at 0 against rounding); pairs ``s > t``
are masked before the ``exp``. ``b`` is kept as a compensated float32 pair ``hi + lo``:
under strong decay ``|b|`` reaches ``20 C`` and a plain float32 ``b_t - b_s`` would lose
``eps |b|`` (a 1e-5 relative error on decay factors already at C = 32, the dominant error
of d log_decay); with the pair it is as exact as the oracle's step-by-step decay. (We do
not use a ``tril(1) @ g`` MXU matmul: it has the same cancellation and costs 6 MXU
passes at float32 precision.)

* Scalar decay (per head): the chunk-local prefix sums are computed in XLA (4 bytes per
  token and head) and enter as ``[.., chunks, C]`` row blocks; the ``[C, C]`` decay
  matrix is formed directly.
* Per-channel decay (GLA): ``b`` by a log-step scan of sublane rolls in the kernel. The
  intra-chunk scores use sub-chunks of ``c = 16`` tokens: a query sub-chunk after key
  sub-chunk ``j`` factors with the reference ``r = b`` at the end of sub-chunk ``j``,
  ``(q_t exp(b_t - r)) . (k_s exp(r - b_s))``, both factors ``<= 1`` (one MXU matmul per
  ``j``); the diagonal ``c x c`` sub-blocks use an explicit per-channel decay
  ``exp(b_t - b_s)`` (``c`` exponentials of ``[c, K]`` each). We chose sub-chunks over the
  plain ``[C, C, K]`` tensor because it is ``C / c = 4`` times fewer exponentials at
  ``C = 64`` and keeps the VMEM temporaries at ``[c, K]``.
* Segments (``runs``): the kernel receives run ids relative to the run of the token before
  the chunk; pairs across runs are masked, the state entering the chunk reaches only
  tokens of that run (relative id 0), only tokens of the chunk's last run write into the
  state leaving it, and the carried state is zeroed when the last run is not run 0.

Backward (``jax.custom_vjp``; dq, dk, dv, d log_decay, d initial_state): one reverse kernel
over blocks holding ``dS = dL/dS_out`` in VMEM. The forward (when differentiated) stores
the state entering every *block* as a residual ``[B, Hv, blocks, K, V]`` float32; the
backward recomputes the ``m`` chunk-entry states of a block from the k, v, g it has in
VMEM anyway (one ``[K, C] @ [C, V]`` matmul per chunk), then walks the chunks in reverse.
Storing every chunk state instead would add ``4 K V / C`` bytes per token (1 KiB at
K = V = 128, C = 64: as much as q, k, v and o together); per block it is 64 B per token,
and the recompute costs only MXU time, no HBM traffic. Every term of a chunk depends on
``b`` only through ``exp(b_t - b_s)``, ``exp(b_t)``, ``exp(b_L - b_s)`` or ``exp(b_L)``,
which gives the decay gradient (per channel; summed over K for scalar decay)

    dg_u = sum_{t >= u} (q_t dq'_t - k_t dk'_t) + sum_{s < u} k_s dk^S_s
           + carry * exp(b_L) (S_in * dS).sum(V)

where ``dk^S`` is the state-output part of dk, ``dq'`` and ``dk'`` leave out the ``s = t``
pairs and ``dk'`` also leaves out ``dk^S``. The textbook form ``revcumsum(q dq - k dk) +
(S_out * dS).sum(V)`` is the same number, but it adds and then cancels those undecayed
terms, which leaves rounding noise far above a small d log_decay under strong decay.

Layout. ``[B, T, H, D]`` is viewed as ``[B, T, H * D]`` (free) so a ``(C', D)`` block picks
one head, and ``index_map`` picks the q/k head ``h // rep`` for v head ``h`` (q and k are
never repeated; their gradients come out per v head and are summed over the group).
``K`` and ``V`` are zero-padded to multiples of 128 (exact: padded channels have
``k = 0``, ``g = 0``), ``T`` to whole blocks. States, decay sums and accumulators are
float32; matmul operands follow ``chunk.py``'s policy (raw bf16 inputs exact, float32
intermediates split into bf16 hi + lo; fp16/fp32 at float32 precision).

Roofline (per token and head, K = V = 128, C = 64, bf16; counting MXU work in bf16 passes).
Forward: ``q k^T`` (16 kFLOP, 1 pass), ``q S``, ``k~^T v`` (32 kFLOP each, 2 passes), ``A
v`` (16 kFLOP, 2 passes): 176 kFLOP of MXU time; HBM traffic is q, k, v, o = 1024 B (+ 8 B
scalar or 512 B per-channel decay; + 64 B of block states when differentiated). v5e (197
TFLOP/s, 819 GB/s): 0.9 ns compute vs 1.25 ns memory per token-head, so bandwidth-bound. v5p
(459 TFLOP/s, 2765 GB/s): 0.38 vs 0.37 ns, balanced. Backward: ~464 kFLOP of passes (state
recompute included) over ~1.9 KB: v5e ~2.4 ns (balanced), v5p ~1.0 ns (MXU-bound). Per-
channel decay adds ``c K = 2048`` exponentials and ~20 k elementwise VPU ops per token
forward (x2 backward) for the diagonal sub-blocks: at the order of 5 T elementwise ops/s
this is ~2x the memory time on v5e and dominates on v5p. A block of 1024 tokens moves 1 MiB
per head: 1.3 us on v5e, 0.4 us on v5p, so the per-step overhead is hidden on v5e and
marginal on v5p. D = 64 is padded to 128: twice the traffic of q, k (v, o). The kernels are
checked in interpret mode and by lowering to Mosaic (``seqmix.testing.lower_for``), which
does not run Mosaic's own layout passes.
"""

from seqmix.kernels.linear_attention.tpu.ops import linear_attention
from seqmix.kernels.linear_attention.tpu.step import linear_attention_step

__all__ = ["linear_attention", "linear_attention_step"]
