"""Tuning of the attention kernels: the Configs of the Pallas backends and their tables.

Triton (``TritonConfig``, ``TritonDecodeConfig``). The table is keyed by GPU generation,
kernel kind and head dim (the next power of two of ``D``, at least 16; the tuning key is
``"d<bucket>"``). Rows read as ``Blocks(block_q, block_k, num_warps, num_stages)``:

- ``fwd``: the forward. ``block_q`` query rows per program, ``block_k`` keys per step of its
  loop (FlashAttention-2: the query tile stays in registers, K/V tiles stream through).
- ``bwd``: the dK/dV kernel. ``block_k`` keys stay resident per program while it walks
  ``block_q``-row query tiles (of every query head of its KV head's group).
- ``bwd_dq``: the dQ kernel, shaped like the forward (``block_q`` resident, ``block_k`` steps).
- ``decode``: split-K decoding. ``block_q`` is the padded number of query heads read together
  per KV head (a dot needs >= 16 rows), ``block_k`` the cache entries per loop step; the
  split count is the decoder's own choice unless ``TritonDecodeConfig.num_splits`` is set.

float32 inputs take half the table's ``block_k`` (twice the bytes per element), and fewer
stages or a smaller ``block_q`` where the tiles would not fit shared memory (a Config's own
blocks are used as given); interpret mode (CPU tests) takes 16 x 16 tiles so that the
interpreter stays fast.

TPU (``TpuConfig``, ``TpuDecodeConfig``): the flash kernels' (block_q, block_k) per padded
head dim, multiples of 128; the decoder's keys per slab, parallel splits and KV heads per
program.

To retune, time candidates with ``seqmix.kernels.tune.autotune`` (``SEARCH`` holds the
Triton candidates) and point ``SEQMIX_TUNING`` at the file it writes, or edit the tables.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from seqmix.kernels import tune
from seqmix.kernels.common import current_device_kind, generation
from seqmix.kernels.tune import Axis

KINDS = ("fwd", "bwd", "bwd_dq", "decode")
FLASH_KINDS = ("fwd", "bwd", "bwd_dq")


@dataclasses.dataclass(frozen=True)
class Blocks:
    """Tile of one attention kernel: ``block_q x block_k`` logits per step."""

    block_q: int
    block_k: int
    num_warps: int
    num_stages: int


@dataclasses.dataclass(frozen=True)
class TritonConfig:
    """``pallas_triton`` attention: the tile of each kernel (None: the table's)."""

    fwd: Blocks | None = None
    bwd: Blocks | None = None
    bwd_dq: Blocks | None = None


@dataclasses.dataclass(frozen=True)
class TritonDecodeConfig:
    """``pallas_triton`` decode_attention: cache entries per loop step, warps, stages (None:
    the table's) and splits per row (None: from the cache length and the SM count)."""

    block_k: int | None = None
    num_warps: int | None = None
    num_stages: int | None = None
    num_splits: int | None = None


@dataclasses.dataclass(frozen=True)
class TpuConfig:
    """``pallas_tpu`` attention: query and key block, multiples of 128 (None: the table's,
    shrunk to the sequence so that padding stays under 1/8)."""

    block_q: int | None = None
    block_k: int | None = None


@dataclasses.dataclass(frozen=True)
class TpuDecodeConfig:
    """``pallas_tpu`` decode_attention: keys per slab, a multiple of 128 (None: ~1 MiB of K
    per slab), parallel splits and KV heads per program (None: the fewest forming a legal,
    >= 512-byte lane tile)."""

    block_k: int | None = None
    num_splits: int | None = None
    heads_per_block: int | None = None


B = Blocks

# generation -> kind -> head dim -> Blocks. Hopper (sm90: H100/H200, 228 KB shared memory per
# SM) is the measured target; "ampere" (sm80, 164 KB) and "ada" (sm86/89, 100 KB) are safe
# scalings of it; "blackwell" starts from Hopper's row.
_HOPPER = {
    # D = 64 rows: the autotuner's winners at T = 8192 causal (tune.autotune with SEARCH
    # below; the timings are in BENCHMARKS.md).
    "fwd": {
        16: B(128, 64, 4, 3),
        32: B(128, 64, 4, 3),
        64: B(128, 64, 8, 3),
        128: B(128, 128, 8, 3),
        256: B(64, 64, 8, 2),
    },
    "bwd": {
        16: B(64, 128, 4, 3),
        32: B(64, 128, 4, 3),
        64: B(32, 128, 4, 3),
        128: B(64, 128, 8, 2),
        256: B(32, 64, 8, 2),
    },
    "bwd_dq": {
        16: B(128, 64, 4, 3),
        32: B(128, 64, 4, 3),
        64: B(128, 64, 4, 3),
        128: B(128, 32, 8, 3),
        256: B(64, 32, 8, 2),
    },
    "decode": {
        16: B(16, 128, 4, 3),
        32: B(16, 128, 4, 3),
        64: B(16, 128, 4, 3),
        128: B(16, 128, 4, 3),
        256: B(16, 64, 4, 2),
    },
}
_AMPERE = {
    "fwd": {
        16: B(128, 64, 4, 3),
        32: B(128, 64, 4, 3),
        64: B(128, 64, 4, 3),
        128: B(128, 64, 8, 2),
        256: B(64, 32, 8, 2),
    },
    "bwd": {
        16: B(64, 64, 4, 2),
        32: B(64, 64, 4, 2),
        64: B(64, 128, 4, 2),
        128: B(64, 64, 8, 2),
        256: B(32, 32, 8, 1),
    },
    "bwd_dq": {
        16: B(64, 64, 4, 2),
        32: B(64, 64, 4, 2),
        64: B(128, 64, 4, 2),
        128: B(64, 64, 8, 2),
        256: B(32, 32, 8, 1),
    },
    "decode": {
        16: B(16, 128, 4, 2),
        32: B(16, 128, 4, 2),
        64: B(16, 128, 4, 2),
        128: B(16, 64, 4, 2),
        256: B(16, 32, 4, 2),
    },
}
_ADA = {
    "fwd": {
        16: B(64, 64, 4, 2),
        32: B(64, 64, 4, 2),
        64: B(64, 64, 4, 2),
        128: B(64, 64, 4, 2),
        256: B(32, 32, 4, 1),
    },
    "bwd": {
        16: B(32, 64, 4, 2),
        32: B(32, 64, 4, 2),
        64: B(32, 64, 4, 2),
        128: B(32, 64, 4, 1),
        256: B(16, 32, 4, 1),
    },
    "bwd_dq": {
        16: B(64, 32, 4, 2),
        32: B(64, 32, 4, 2),
        64: B(64, 32, 4, 2),
        128: B(64, 32, 4, 1),
        256: B(32, 16, 4, 1),
    },
    "decode": {
        16: B(16, 64, 4, 2),
        32: B(16, 64, 4, 2),
        64: B(16, 64, 4, 2),
        128: B(16, 64, 4, 2),
        256: B(16, 32, 4, 1),
    },
}
_TABLE = {"hopper": _HOPPER, "blackwell": _HOPPER, "ampere": _AMPERE, "ada": _ADA}

_INTERPRET = Blocks(16, 16, 4, 1)

# TPU: (query block, key block) per padded head dim, the same for fwd, dQ and dK/dV so that
# one padding serves all three kernels. Power-of-two multiples of 128 (lane width), chosen
# for arithmetic intensity >= the v5e/v5p ridge within the 16 MiB default scoped VMEM (the
# dK/dV kernel at D = 256 holds ~9 MiB); Dp > 256 takes the large-head row; interpret mode
# the smallest legal blocks (many grid steps on tiny test shapes).
TPU_BLOCKS = {128: TpuConfig(512, 512), 256: TpuConfig(512, 256)}
TPU_LARGE_HEAD = TpuConfig(256, 256)
TPU_INTERPRET = TpuConfig(128, 128)
# TPU decoding: two splits keep both TensorCores of a megacore (v4, v5p) busy at B = 1.
TPU_DECODE = TpuDecodeConfig(block_k=None, num_splits=2, heads_per_block=None)
TPU_DECODE_INTERPRET = TpuDecodeConfig(block_k=128, num_splits=2, heads_per_block=None)
TPU_LANES = 128

# The autotuner's search for the Triton flash kernels: the forward alone, then dK/dV and dQ
# inside forward + backward (each with the other kernels at their best so far).
SEARCH = {
    ("attention", "pallas_triton"): (
        Axis(
            "fwd",
            [
                B(128, 64, 4, 3),
                B(128, 64, 8, 3),
                B(128, 128, 8, 2),
                B(128, 128, 8, 3),
                B(128, 32, 4, 4),
                B(64, 64, 4, 3),
                B(64, 128, 4, 3),
                B(128, 64, 8, 2),
            ],
        ),
        Axis(
            "bwd",
            [
                B(64, 128, 8, 2),
                B(32, 128, 4, 3),
                B(64, 128, 4, 2),
                B(64, 64, 4, 3),
                B(32, 64, 4, 4),
                B(128, 128, 8, 1),
                B(64, 64, 8, 2),
                B(16, 128, 4, 4),
            ],
            backward=True,
        ),
        Axis(
            "bwd_dq",
            [
                B(128, 64, 8, 2),
                B(128, 32, 4, 3),
                B(64, 64, 4, 3),
                B(128, 64, 4, 3),
                B(128, 128, 8, 2),
                B(64, 32, 4, 4),
                B(128, 32, 8, 3),
            ],
            backward=True,
        ),
    ),
    ("decode_attention", "pallas_triton"): (
        Axis("block_k", [32, 64, 128, 256]),
        Axis("num_warps", [2, 4, 8]),
        Axis("num_stages", [1, 2, 3, 4]),
    ),
}


def head_dim_bucket(head_dim: int) -> int:
    """The padded head dim a kernel computes with: next power of two, at least 16."""
    if head_dim < 1:
        raise ValueError(f"head_dim must be >= 1, got {head_dim}")
    return max(16, 1 << (head_dim - 1).bit_length())


# Shared memory per block a kernel may take, by generation (the opt-in maximum less a margin
# for Triton's own scratch: an H100 grants 232448 bytes).
SMEM_BYTES = {"hopper": 224 * 1024, "blackwell": 224 * 1024, "ampere": 160 * 1024, "ada": 96 * 1024}


def smem_bytes(blocks: Blocks, kind: str, head_dim: int, itemsize: int) -> int:
    """Shared memory a flash kernel's pipelined tiles take: the resident tile(s) plus
    ``num_stages`` copies of the two streamed ones (K and V for ``fwd`` and ``bwd_dq``, which
    also holds dO; Q and dO for ``bwd``, whose K and V stay resident)."""
    row = head_dim_bucket(head_dim) * itemsize
    if kind == "bwd":
        resident, streamed = 2 * blocks.block_k * row, 2 * blocks.block_q * row
    else:
        resident = (2 if kind == "bwd_dq" else 1) * blocks.block_q * row
        streamed = 2 * blocks.block_k * row
    return resident + blocks.num_stages * streamed


def _fit_float32(blocks: Blocks, dtype, kind: str, head_dim: int, gen: str) -> Blocks:
    """float32 inputs: half the table's ``block_k`` (twice the bytes per element), then fewer
    pipeline stages, then half ``block_q``, until the tiles fit the generation's shared
    memory (float32 at D = 128 on three stages asks an H100 for 257 KB)."""
    itemsize = jnp.dtype(dtype).itemsize
    if itemsize < 4:
        return blocks
    blocks = dataclasses.replace(blocks, block_k=max(16, blocks.block_k // 2))
    budget = SMEM_BYTES.get(gen, SMEM_BYTES["ampere"])
    while smem_bytes(blocks, kind, head_dim, itemsize) > budget:
        if blocks.num_stages > 2:
            blocks = dataclasses.replace(blocks, num_stages=blocks.num_stages - 1)
        elif blocks.block_q > 16:
            blocks = dataclasses.replace(blocks, block_q=blocks.block_q // 2)
        elif blocks.block_k > 16:
            blocks = dataclasses.replace(blocks, block_k=blocks.block_k // 2)
        else:
            break
    return blocks


def attention_blocks(
    head_dim: int,
    dtype=jnp.bfloat16,
    device_kind: str | None = None,
    kind: str = "fwd",
    *,
    interpret: bool = False,
) -> Blocks:
    """The table's tile, warps and stages of attention kernel ``kind`` (one of ``KINDS``).

    Args:
      head_dim: the head dim ``D`` (rounded up to a power of two >= 16 for the lookup).
      dtype: the input dtype; float32 halves ``block_k`` (not for ``decode``).
      device_kind: ``jax.Device.device_kind`` of the target GPU; ``None`` means the current
        GPU if there is one, else the default generation (Hopper).
      kind: ``"fwd"``, ``"bwd"`` (dK/dV kernel), ``"bwd_dq"`` or ``"decode"``.
      interpret: small tiles for the CPU interpreter.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if interpret:
        return _INTERPRET
    bucket = head_dim_bucket(head_dim)
    if bucket > 256:
        raise NotImplementedError(f"no attention tile for head_dim={head_dim} (> 256)")
    if device_kind is None:
        device_kind = current_device_kind()
    gen = generation(device_kind)
    blocks = _TABLE[gen][kind][bucket]
    return blocks if kind == "decode" else _fit_float32(blocks, dtype, kind, head_dim, gen)


def triton_config(
    config: TritonConfig | None,
    head_dim: int,
    dtype,
    *,
    interpret: bool,
    device_kind: str | None = None,
) -> TritonConfig:
    """The ``TritonConfig`` a flash-attention call runs with (``tune.resolve``): the table's
    tiles of this GPU (float32 halves the table's and the tuning file's ``block_k``), then
    ``config``'s."""
    table = {
        kind: attention_blocks(head_dim, jnp.bfloat16, device_kind, kind, interpret=interpret)
        for kind in FLASH_KINDS
    }

    def halve(c: TritonConfig) -> TritonConfig:
        if interpret:
            return c
        gen = generation(device_kind or current_device_kind())
        return TritonConfig(
            **{k: _fit_float32(getattr(c, k), dtype, k, head_dim, gen) for k in FLASH_KINDS}
        )

    return tune.resolve(
        "attention",
        "pallas_triton",
        f"d{head_dim_bucket(head_dim)}",
        TritonConfig(**table),
        config,
        interpret=interpret,
        adjust=halve,
    )


def triton_decode_config(
    config: TritonDecodeConfig | None, head_dim: int, dtype, *, interpret: bool
) -> TritonDecodeConfig:
    """The ``TritonDecodeConfig`` a decoding call runs with (``tune.resolve``)."""
    row = attention_blocks(head_dim, dtype, kind="decode", interpret=interpret)
    default = TritonDecodeConfig(
        block_k=row.block_k, num_warps=row.num_warps, num_stages=row.num_stages
    )
    return tune.resolve(
        "decode_attention",
        "pallas_triton",
        f"d{head_dim_bucket(head_dim)}",
        default,
        config,
        interpret=interpret,
    )


def tpu_config(
    config: TpuConfig | None, padded_head_dim: int, *, interpret: bool, adjust=None
) -> TpuConfig:
    """The ``TpuConfig`` a flash-attention call on a TPU runs with; ``adjust`` fits the
    table's (and the tuning file's) blocks to the sequence."""
    if interpret:
        default = TPU_INTERPRET
    else:
        default = TPU_BLOCKS.get(padded_head_dim, TPU_LARGE_HEAD)
    cfg = tune.resolve(
        "attention",
        "pallas_tpu",
        f"d{padded_head_dim}",
        default,
        config,
        interpret=interpret,
        adjust=None if interpret else adjust,
    )
    if cfg.block_q % TPU_LANES or cfg.block_k % TPU_LANES:
        raise ValueError(f"TpuConfig blocks must be multiples of {TPU_LANES}, got {cfg}")
    return cfg


def tpu_decode_config(
    config: TpuDecodeConfig | None, head_dim: int, *, interpret: bool
) -> TpuDecodeConfig:
    """The ``TpuDecodeConfig`` a decoding call on a TPU runs with."""
    cfg = tune.resolve(
        "decode_attention",
        "pallas_tpu",
        f"d{head_dim_bucket(head_dim)}",
        TPU_DECODE_INTERPRET if interpret else TPU_DECODE,
        config,
        interpret=interpret,
    )
    if cfg.block_k is not None and cfg.block_k % TPU_LANES:
        raise ValueError(f"TpuDecodeConfig.block_k must be a multiple of {TPU_LANES}, got {cfg}")
    return cfg
