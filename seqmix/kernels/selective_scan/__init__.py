"""Mamba-1's selective scan."""

from seqmix.kernels.selective_scan.api import selective_scan

__all__ = ["selective_scan"]
