"""Softmax attention in Pallas Triton (GPU): flash attention forward and backward
(``forward.py``, ``backward.py``, wired in ``ops.py``) and split-K decoding (``decode.py``).

``o = softmax(c * tanh(scale * q k^T / c) + mask) v`` (no tanh without ``softcap=c``) with
``q [B, T, H, D]``, ``k, v [B, S, Hkv, D]``, query head ``h`` reading KV head ``h // G``
(``G = H / Hkv``), and the natural log-sum-exp ``lse [B, T, H]`` (float32).

``segment_ids`` (and ``kv_segment_ids``, the keys' own ids where they differ) mask across
segments; for non-decreasing ids (packed sequences) each block also skips the blocks of
other segments (a row whose ids are not sorted is masked only).
Measured speed: BENCHMARKS.md (attention, decode_attention).
"""

from seqmix.kernels.attention.triton.decode import decode_attention
from seqmix.kernels.attention.triton.ops import attention, flash_attention

__all__ = ["attention", "decode_attention", "flash_attention"]
