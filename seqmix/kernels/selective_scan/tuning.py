"""Tuning of the selective-scan kernels: the Configs of the Pallas backends and their tables
(see ``seqmix.kernels.tune`` for how a call's Config is resolved; one key, ``"default"``).
"""

from __future__ import annotations

import dataclasses

from seqmix.kernels import tune
from seqmix.kernels.common import current_device_kind, generation
from seqmix.kernels.tune import Axis

DEFAULT_KEY = "default"


@dataclasses.dataclass(frozen=True)
class TritonConfig:
    """``pallas_triton`` selective_scan (None: the table's).

    Attributes:
      block_d: channels per program, a power of 2; shrunk to divide the channels per group.
      chunk: time steps scanned at once (a power of 2), and between the states the
        forward saves for the backward.
      num_warps, bwd_num_warps, num_stages: of the forward and backward kernels.
      algorithm: the kernels of the training path (``jax.vjp`` / ``jax.grad``: the forward
        that saves residuals, and the backward): "chunked" (the chunked two-level scan;
        None means it) or "lanes" (one channel per lane, ``triton/lanes.py``, with tiles
        of its own: ``lanes_tiles.GPU_TILES``; the fields above then tune only the
        primal-only call). The primal-only call (no gradient) always runs the chunked
        forward.
    """

    block_d: int | None = None
    chunk: int | None = None
    num_warps: int | None = None
    bwd_num_warps: int | None = None
    num_stages: int | None = None
    algorithm: str | None = None


# The values of ``TritonConfig.algorithm`` (None: "chunked").
TRITON_ALGORITHMS = ("chunked", "lanes")


@dataclasses.dataclass(frozen=True)
class TpuConfig:
    """``pallas_tpu`` selective_scan (None: the table's).

    Attributes:
      chunk: time steps per grid step, on sublanes (a multiple of 8 for 32-bit and of 16
        for 16-bit inputs): the span of the in-register scan and between saved states.
      block_c: channels per program, on lanes (a multiple of 128; each group's channels are
        padded to a multiple of it).
    """

    chunk: int | None = None
    block_c: int | None = None


# A [16, 32, 8] (state, time, channel) tile: 4K float32 a tensor; 1536 programs at
# [8, 4096, 1536] and 384 at [2, 16384, 1536]. The backward holds about twice the forward's
# tiles (two scans of 4 operands). Warps: the autotuner's choice on an H100 at
# [8, 4096, 1536, 16] (forward + backward 14.6 ms against 15.5 ms with 4 and 8 warps; chunks
# of 16 or 64 and 4 to 32 channels a program were no faster: the chunked backward's figures).
# The training path on the lanes kernels: on an H100 (2026-12-06, bf16), forward + backward
# 12.0 ms at [8, 4096, 1536, 16] and 16.1 ms at [2, 16384, 1536, 16], against 15.2 and
# 19.8 ms with the chunked backward; a call without gradient keeps the chunked forward
# (2.6 ms against the lanes forward's 3.2 ms).
_HOPPER = TritonConfig(
    block_d=8, chunk=32, num_warps=2, bwd_num_warps=4, num_stages=1, algorithm="lanes"
)
# generation -> TritonConfig. Hopper is the target; the others start from its row.
TRITON = {"hopper": _HOPPER, "blackwell": _HOPPER, "ampere": _HOPPER, "ada": _HOPPER}
# Interpret mode: short chunks, so the tests' odd lengths span several chunks.
# The chunked backward in interpret mode, so that most cases test it; the lanes cases set
# ``algorithm="lanes"``.
TRITON_INTERPRET = dataclasses.replace(_HOPPER, block_d=8, chunk=8, algorithm="chunked")
TPU = TpuConfig(chunk=32, block_c=512)
TPU_INTERPRET = TpuConfig(chunk=8, block_c=128)

# The autotuner's search for the Triton kernels (forward + backward).
SEARCH = {
    ("selective_scan", "pallas_triton"): (
        Axis("algorithm", ["chunked", "lanes"], backward=True),
        Axis("chunk", [16, 32, 64], backward=True),
        Axis("block_d", [4, 8, 16, 32], backward=True),
        Axis("num_warps", [2, 4, 8], backward=True),
        Axis("bwd_num_warps", [4, 8], backward=True),
    ),
}


def triton_config(
    config: TritonConfig | None, *, interpret: bool, device_kind: str | None = None
) -> TritonConfig:
    """The ``TritonConfig`` a call runs with."""
    default = (
        TRITON_INTERPRET if interpret else TRITON[generation(device_kind or current_device_kind())]
    )
    return tune.resolve(
        "selective_scan", "pallas_triton", DEFAULT_KEY, default, config, interpret=interpret
    )


def tpu_config(config: TpuConfig | None, *, interpret: bool) -> TpuConfig:
    """The ``TpuConfig`` a call on a TPU runs with."""
    return tune.resolve(
        "selective_scan",
        "pallas_tpu",
        DEFAULT_KEY,
        TPU_INTERPRET if interpret else TPU,
        config,
        interpret=interpret,
    )
