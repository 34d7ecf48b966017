"""Short causal depthwise convolution (the conv in front of Mamba-style mixers)."""

from seqmix.kernels.conv1d.api import causal_conv1d, causal_conv1d_step

__all__ = ["causal_conv1d", "causal_conv1d_step"]
