"""Softmax attention: flash attention (causal, GQA, windows, segments, softcap) and decoding."""

from seqmix.kernels.attention.api import attention, decode_attention

__all__ = ["attention", "decode_attention"]
