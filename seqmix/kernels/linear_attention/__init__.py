"""Chunked gated linear attention: linear attention, RetNet, GLA and Mamba-2's SSD."""

from seqmix.kernels.linear_attention.api import linear_attention, linear_attention_step

__all__ = ["linear_attention", "linear_attention_step"]
