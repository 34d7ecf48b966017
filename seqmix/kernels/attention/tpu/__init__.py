"""Softmax attention in Pallas Mosaic TPU: flash attention forward and backward
(``forward.py``, ``backward.py``, wired in ``ops.py``) and split-K decoding (``decode.py``).

``attention(q, k, v, *, causal, window, segment_ids, softcap, scale, return_lse,
kv_segment_ids)`` computes ``o = softmax(mask(cap(scale * q k^T))) v`` and
``lse = log sum exp(...)`` with the contract of ``seqmix.kernels.attention.api``
(``q [B,T,H,D]``, ``k, v [B,S,Hkv,D]``, ``o`` in q's dtype, ``lse [B,T,H]`` float32,
``o = 0`` and ``lse = -inf`` for a query that sees no key).
"""

from seqmix.kernels.attention.tpu.decode import decode_attention
from seqmix.kernels.attention.tpu.ops import attention

__all__ = ["attention", "decode_attention"]
