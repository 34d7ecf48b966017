"""The one table of attention tile sizes, warps and pipeline stages (Pallas Triton kernels).

Every Triton attention kernel of seqmix (the flash forward, its two backward kernels and the
split-K decoder) takes its blocks from ``attention_blocks``; no kernel holds a literal.

The table is keyed by GPU generation, kernel kind and head dim (the next power of two of
``D``, at least 16). To retune, edit ``_TABLE`` below: one row per (generation, kind), one
entry per head dim. Rows read as ``Blocks(block_q, block_k, num_warps, num_stages)``:

- ``fwd``: the forward. ``block_q`` query rows per program, ``block_k`` keys per step of its
  loop (FlashAttention-2: the query tile stays in registers, K/V tiles stream through).
- ``bwd``: the dK/dV kernel. ``block_k`` keys stay resident per program while it walks
  ``block_q``-row query tiles (of every query head of its KV head's group).
- ``bwd_dq``: the dQ kernel, shaped like the forward (``block_q`` resident, ``block_k`` steps).
- ``decode``: split-K decoding. ``block_q`` is the padded number of query heads read together
  per KV head (a dot needs >= 16 rows), ``block_k`` the cache entries per loop step; the
  split count is the decoder's own choice (it depends on batch and cache length).

float32 inputs take half the ``block_k`` (twice the bytes per element); interpret mode
(CPU tests) takes 16 x 16 tiles so that the interpreter stays fast.

To try tiles on a new GPU without editing the table, point ``SEQMIX_ATTENTION_TUNING`` at a
JSON file ``{"<kind>": {"<head dim bucket>": [block_q, block_k, num_warps, num_stages]}}``
(``seqmix.experiments.bench.attention.tune_blocks(..., out=path)`` writes one): its entries replace
the table's for every generation while the variable is set.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp

KINDS = ("fwd", "bwd", "bwd_dq", "decode")


@dataclasses.dataclass(frozen=True)
class Blocks:
    """Tile of one attention kernel: ``block_q x block_k`` logits per step."""

    block_q: int
    block_k: int
    num_warps: int
    num_stages: int


B = Blocks

# generation -> kind -> head dim -> Blocks. Hopper (sm90: H100/H200, 228 KB shared memory per
# SM) is the measured target; "ampere" (sm80, 164 KB) and "ada" (sm86/89, 100 KB) are safe
# scalings of it; "blackwell" starts from Hopper's row.
_HOPPER = {
    # D = 64 rows from `tune_blocks(64)` (H200, 2026-11-28, T = 8192 causal, ms fwd / fwd+bwd):
    # forward 128x64 8 warps 1.58 (128x128 4 warps, the old row, was not a candidate; 128x64
    # 4 warps 1.65); dK/dV 32x128 4 warps 3 stages 6.09 (the old row 64x128 4 warps 2
    # stages: 16.8, its spill made the backward 9x the forward; 64x128 8 warps 6.64); dQ
    # 128x64 4 warps 5.87 (7 candidates within 8%). With them the benchmark's D = 64
    # fwd+bwd went from 97-138 to 240-362 TFLOP/s (BENCHMARKS.md).
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

# device_kind substrings -> generation, first match wins (jax.Device.device_kind strings).
_GENERATIONS = (
    (("GB200", "GB300", "B200", "B300", "B100", "RTX PRO 6000", "5090", "5080"), "blackwell"),
    (("H100", "H200", "H800", "H20", "GH200"), "hopper"),
    (("A100", "A800", "A30"), "ampere"),
    (
        (
            "A10",
            "A16",
            "A40",
            "A6000",
            "A5000",
            "A4000",
            "L4",
            "L40",
            "RTX 30",
            "RTX 40",
            "3090",
            "3080",
            "4090",
            "4080",
            "Ada",
        ),
        "ada",
    ),
)
DEFAULT_GENERATION = "hopper"  # the project's measured target (lowering checks on a CPU)


def generation(device_kind: str | None) -> str:
    """GPU generation of a ``jax.Device.device_kind`` string; ``None`` or an unknown kind
    gives ``DEFAULT_GENERATION`` for ``None`` and ``"ampere"`` (conservative) otherwise."""
    if device_kind is None:
        return DEFAULT_GENERATION
    for needles, gen in _GENERATIONS:
        if any(n.lower() in device_kind.lower() for n in needles):
            return gen
    return "ampere"


@functools.cache
def current_device_kind() -> str | None:
    """The first GPU's device kind, or ``None`` when this process has no GPU."""
    try:
        gpus = jax.devices("gpu")
    except RuntimeError:
        return None
    return gpus[0].device_kind if gpus else None


OVERRIDE_ENV = "SEQMIX_ATTENTION_TUNING"


def overrides(path: str) -> dict[str, dict[int, Blocks]]:
    """The entries of a tuning JSON file (see the module doc); ``""`` gives none. Read again
    when the file changes (a notebook may retune and rewrite it)."""
    if not path:
        return {}
    try:
        stamp = os.stat(path).st_mtime_ns
    except OSError as e:
        raise ValueError(f"{OVERRIDE_ENV}={path!r}: not a readable tuning JSON file ({e})") from e
    return _read_overrides(path, stamp)


@functools.lru_cache(maxsize=8)
def _read_overrides(path: str, stamp: int) -> dict[str, dict[int, Blocks]]:
    del stamp  # part of the cache key only
    try:
        with open(path) as f:
            raw = json.load(f)
        table = {
            kind: {int(d): Blocks(*map(int, b)) for d, b in rows.items()}
            for kind, rows in raw.items()
        }
    except (OSError, ValueError, TypeError, AttributeError) as e:
        raise ValueError(f"{OVERRIDE_ENV}={path!r}: not a readable tuning JSON file ({e})") from e
    unknown = set(table) - set(KINDS)
    if unknown:
        raise ValueError(
            f"{OVERRIDE_ENV}={path!r}: unknown kinds {sorted(unknown)}; expected some of {KINDS}"
        )
    return table


def head_dim_bucket(head_dim: int) -> int:
    """The padded head dim a kernel computes with: next power of two, at least 16."""
    if head_dim < 1:
        raise ValueError(f"head_dim must be >= 1, got {head_dim}")
    return max(16, 1 << (head_dim - 1).bit_length())


def attention_blocks(
    head_dim: int,
    dtype=jnp.bfloat16,
    device_kind: str | None = None,
    kind: str = "fwd",
    *,
    interpret: bool = False,
) -> Blocks:
    """Tile sizes, warps and stages of attention kernel ``kind`` (one of ``KINDS``).

    Args:
      head_dim: the head dim ``D`` (rounded up to a power of two >= 16 for the lookup).
      dtype: the input dtype; float32 halves ``block_k``.
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
    blocks = overrides(os.environ.get(OVERRIDE_ENV, "")).get(kind, {}).get(bucket)
    if blocks is None:
        blocks = _TABLE[generation(device_kind)][kind][bucket]
    if jnp.dtype(dtype).itemsize >= 4 and kind != "decode":
        blocks = dataclasses.replace(blocks, block_k=max(16, blocks.block_k // 2))
    return blocks
