"""Chunked gated linear attention in Pallas Mosaic GPU (Hopper: wgmma, TMA pipelines); its
tuning is ``seqmix.kernels.linear_attention.tuning.MosaicGpuConfig``."""

from seqmix.kernels.linear_attention.mosaic_gpu.engine import linear_attention

__all__ = ["linear_attention"]
