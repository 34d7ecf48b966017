"""Tuning of the causal-convolution kernels: the Configs of the Pallas backends and their
tables (see ``seqmix.kernels.tune`` for how a call's Config is resolved; one key,
``"default"``). The decoding step of each backend takes the same Config as its convolution
(its ``block_c`` and ``num_warps``).
"""

from __future__ import annotations

import dataclasses

from seqmix.kernels import tune
from seqmix.kernels.common import current_device_kind, generation
from seqmix.kernels.tune import Axis

DEFAULT_KEY = "default"


@dataclasses.dataclass(frozen=True)
class TritonConfig:
    """``pallas_triton`` causal_conv1d and causal_conv1d_step (None: the table's):
    ``block_c`` (power of 2) channels per program, ``block_t`` (power of 2) steps per
    program of causal_conv1d's forward (its tile, loaded with the W - 1 row halo),
    ``bwd_block_t`` (power of 2) steps per program of its backward (a sequential sweep),
    ``num_warps``."""

    block_c: int | None = None
    block_t: int | None = None
    num_warps: int | None = None
    bwd_block_t: int | None = None


@dataclasses.dataclass(frozen=True)
class TpuConfig:
    """``pallas_tpu`` causal_conv1d and causal_conv1d_step: ``block_t`` (a multiple of 16)
    steps and ``block_c`` (a multiple of 128) channels per tile."""

    block_t: int | None = None
    block_c: int | None = None


# [32, 256] tiles at 4 warps; 256 channels a decoding program. The autotuner's choice on an H100 at [8, 4096, 3072], width 4 (2026-12-06): 32-step forward
# tiles (0.190 ms forward) and 128-step backward sweeps (0.454 ms forward + backward, 0.507
# with 256).
_HOPPER = TritonConfig(block_c=256, block_t=32, num_warps=4, bwd_block_t=128)
# generation -> TritonConfig. Hopper is the target; the others start from its row.
TRITON = {"hopper": _HOPPER, "blackwell": _HOPPER, "ampere": _HOPPER, "ada": _HOPPER}
TRITON_INTERPRET = TritonConfig(block_c=16, block_t=4, num_warps=1, bwd_block_t=4)
TPU = TpuConfig(block_t=256, block_c=512)
TPU_INTERPRET = TpuConfig(block_t=16, block_c=128)

# The autotuner's search for the Triton kernels (forward + backward).
SEARCH = {
    ("causal_conv1d", "pallas_triton"): (
        Axis("block_c", [64, 128, 256], backward=True),
        Axis("num_warps", [1, 2, 4, 8], backward=True),
        Axis("block_t", [16, 32, 64, 128]),
        Axis("bwd_block_t", [64, 128, 256, 512], backward=True),
    ),
    ("causal_conv1d_step", "pallas_triton"): (
        Axis("block_c", [128, 256, 512, 1024]),
        Axis("num_warps", [1, 2, 4, 8]),
    ),
}


def triton_config(
    config: TritonConfig | None, op: str, *, interpret: bool, device_kind: str | None = None
) -> TritonConfig:
    """The ``TritonConfig`` a call of ``op`` (``causal_conv1d`` or ``causal_conv1d_step``)
    runs with."""
    default = (
        TRITON_INTERPRET if interpret else TRITON[generation(device_kind or current_device_kind())]
    )
    cfg = tune.resolve(op, "pallas_triton", DEFAULT_KEY, default, config, interpret=interpret)
    for name in ("block_c", "block_t", "bwd_block_t"):
        v = getattr(cfg, name)
        if not isinstance(v, int) or v < 1 or v & (v - 1):
            raise ValueError(f"TritonConfig.{name} must be a power of 2, got {v!r}")
    return cfg


def tpu_config(config: TpuConfig | None, op: str, *, interpret: bool) -> TpuConfig:
    """The ``TpuConfig`` a call of ``op`` on a TPU runs with."""
    return tune.resolve(
        op,
        "pallas_tpu",
        DEFAULT_KEY,
        TPU_INTERPRET if interpret else TPU,
        config,
        interpret=interpret,
    )
