"""Building blocks shared by the Mosaic GPU kernels of chunked linear attention.

Register layouts: a chunk of ``C = 64`` tokens is one warpgroup's wgmma tile (``M = 64``),
so every ``[C, N]`` or ``[K, N]`` value lives in ``WGMMA`` layout, per-row vectors (one
value per token, or per key channel of a state) in ``ROW`` and per-column vectors in
``COL``; broadcasting a ``ROW``/``COL`` vector back to ``WGMMA`` is free.

Shared memory: every wgmma operand sits in SMEM tiled ``(8, swizzle / itemsize)`` and
swizzled (128 B where the minor dimension allows), which TMA fills directly and which
makes register <-> SMEM moves of ``WGMMA`` values bank-conflict free. Operands computed
in registers (decay-weighted keys, score matrices) are stored back to SMEM before their
wgmma: the Mosaic GPU interpreter only takes SMEM operands, and the round trip costs one
store of the tile.

Pipelines: ``pipeline`` walks a static number of steps, keeping ``depth`` steps of inputs
in flight through TMA copies that arrive on one barrier per slot; outputs are staged in
SMEM and written with TMA, at most ``out_depth - 1`` copy groups pending.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

F32 = jnp.float32
WGMMA = plgpu.Layout.WGMMA
ROW = plgpu.Layout.WGMMA.reduce(1)  # [M] vector: one value per row of a WGMMA value
COL = plgpu.Layout.WGMMA.reduce(0)  # [N] vector: one value per column

# Lane semantics: layouts are explicit (ROW / COL / WGMMA above), so a value's layout is
# what the code says and a mismatch fails at lowering with the op that caused it.
SEMANTICS = plgpu.LoweringSemantics.Lane


def mma_transforms(dtype, cols: int) -> tuple:
    """Tiling and swizzle for a 2-D SMEM tile of ``cols`` columns used by wgmma / TMA."""
    itemsize = jnp.dtype(dtype).itemsize
    swizzle = plgpu.find_swizzle(cols * itemsize * 8)
    return (plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle))


def tile(shape: Sequence[int], dtype) -> pl.MemoryRef:
    """SMEM scratch for a tile ``[..., rows, cols]`` in the wgmma-ready layout."""
    return plgpu.SMEM(tuple(shape), dtype, transforms=mma_transforms(dtype, shape[-1]))


def vector(shape: Sequence[int], dtype=F32) -> pl.MemoryRef:
    """Plain SMEM scratch (per-token vectors, float32 staging)."""
    return plgpu.SMEM(tuple(shape), dtype)


def matmul(shape: tuple[int, int], *pairs) -> jax.Array:
    """``sum_i lhs_i @ rhs_i`` (float32 ``[M, N]``) for SMEM operand refs ``pairs =
    ((lhs_0, rhs_0), ...)`` (transposed views allowed for 16-bit operands), issued as
    wgmmas into one register accumulator."""

    def compute(acc):
        for lhs, rhs in pairs:
            plgpu.wgmma(acc, lhs, rhs)
        return acc[...]

    return pl.run_scoped(compute, plgpu.ACC(shape, F32))


def store_split(value: jax.Array, hi_ref, lo_ref) -> None:
    """Stores a float32 value as ``hi + lo`` in the 16-bit dtype of ``hi_ref`` (``lo_ref``
    None: ``hi`` alone). Two half-precision parts carry ~16 mantissa bits, so a score
    matrix enters its matmul with float32-like accuracy at the cost of one more wgmma."""
    hi = value.astype(hi_ref.dtype)
    hi_ref[...] = hi
    if lo_ref is not None:
        lo_ref[...] = (value - hi.astype(F32)).astype(lo_ref.dtype)


def rows(vec: jax.Array, shape: tuple[int, int]) -> jax.Array:
    """A ``ROW`` vector broadcast along the columns of a ``WGMMA`` value of ``shape``."""
    return lax.broadcast_in_dim(vec, shape, [0])


def cols(vec: jax.Array, shape: tuple[int, int]) -> jax.Array:
    """A ``COL`` vector broadcast along the rows of a ``WGMMA`` value of ``shape``."""
    return lax.broadcast_in_dim(vec, shape, [1])


def iota(shape: tuple[int, int], dim: int) -> jax.Array:
    return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=WGMMA)


def pipeline(
    *,
    steps: int,
    depth: int,
    barriers,
    fetch: Callable[[jax.Array, jax.Array, object], None],
    body: Callable[[jax.Array, jax.Array, object], object],
    carry: object = None,
):
    """Runs ``body(step, slot, carry) -> carry`` for ``step = 0 .. steps - 1`` with the
    inputs of ``depth`` steps in flight: ``fetch(step, slot, barrier)`` issues the TMA
    copies of one step into buffer ``slot`` (all arriving on ``barrier``, which was
    allocated with one arrival per copy). A slot is refilled only after its step's body
    has finished reading it (its wgmmas were awaited and its register loads are ordered
    before the copy by ``commit_smem``)."""
    depth = max(1, min(depth, steps))
    for s in range(depth):
        fetch(jnp.int32(s), jnp.int32(s), barriers.at[s])

    def loop(i, carry):
        slot = lax.rem(i, jnp.int32(depth))
        plgpu.barrier_wait(barriers.at[slot])
        carry = body(i, slot, carry)
        nxt = i + depth

        @pl.when(nxt < steps)
        def _():
            plgpu.commit_smem()
            fetch(nxt, slot, barriers.at[slot])

        return carry

    return lax.fori_loop(0, steps, loop, carry)


def write_out(pairs: Sequence[tuple[object, object]]) -> None:
    """Issues TMA stores ``smem -> gmem`` for ``pairs`` as one copy group. The caller
    staged the values and must, before staging into the same buffers again, call
    ``before_staging`` with the number of buffers it rotates through."""
    plgpu.commit_smem()
    for src, dst in pairs:
        plgpu.copy_smem_to_gmem(src, dst, commit_group=False)
    plgpu.commit_smem_to_gmem_group()


def before_staging(out_depth: int) -> None:
    """Waits until the output buffers about to be reused have been read by their TMA
    stores (at most ``out_depth - 1`` newer copy groups stay in flight)."""
    plgpu.wait_smem_to_gmem(out_depth - 1, wait_read_only=True)


def finish_writes() -> None:
    plgpu.wait_smem_to_gmem(0)


def kernel(body, *, out_type, grid, grid_names, scratch, interpret, name, **mesh):
    """``plgpu.kernel`` with this package's lowering semantics; ``scratch`` is a dict of
    SMEM / barrier allocations passed to ``body`` by keyword."""
    return plgpu.kernel(
        body,
        out_type=out_type,
        grid=grid,
        grid_names=grid_names,
        scratch_types=scratch,
        compiler_params=plgpu.CompilerParams(lowering_semantics=SEMANTICS),
        interpret=interpret,
        kernel_name=name,
        **mesh,
    )
