"""The static description of one flash-attention call (Pallas Mosaic TPU), its layout
constants and the block-sparse iteration space of its grids.

For causal / windowed attention the KV axis of the grid has only as many steps as the
widest band of visible blocks (``nkv = max_i (hi(i) - lo(i) + 1)``): a 1k window at T = 32k
with 512-blocks runs 3 (causal) or 5 (two-sided) KV steps per query block, not 64. Steps
past a query block's last visible block (causal rows near the top) are skipped with
``pl.when`` and their index map is clamped to the last visible block, so no DMA is issued
for them. Fully visible blocks skip the mask arithmetic; only diagonal / window-edge /
padded blocks build the mask. Segment ids are data, so they mask but do not skip.
"""

from __future__ import annotations

import dataclasses
import functools

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from seqmix.kernels import common

LANES = 128
SUBLANES = 8
NT = (((1,), (1,)), ((), ()))  # a @ b.T
NN = (((1,), (0,)), ((), ()))  # a @ b


@dataclasses.dataclass(frozen=True)
class Cfg:
    """Static description of one call (hashable: a custom_vjp nondiff argument)."""

    B: int
    T: int
    S: int
    H: int
    Hkv: int
    D: int
    Dp: int
    Tp: int
    Sp: int
    bq: int
    bk: int
    causal: bool
    left: int | None
    right: int | None
    softcap: float | None
    scale: float
    has_seg: bool
    dtype: str  # input dtype
    compute_dtype: str  # dtype fed to the kernels (float16 -> float32)
    interpret: bool

    @property
    def G(self) -> int:
        return self.H // self.Hkv

    @property
    def nq(self) -> int:
        return self.Tp // self.bq

    @property
    def nk(self) -> int:
        return self.Sp // self.bk

    @property
    def precision(self):
        return lax.Precision.HIGHEST if self.compute_dtype == "float32" else None


def _max(a, b):
    return max(a, b) if isinstance(a, int) and isinstance(b, int) else jnp.maximum(a, b)


def _min(a, b):
    return min(a, b) if isinstance(a, int) and isinstance(b, int) else jnp.minimum(a, b)


def kv_range(i, c: Cfg):
    """First and last key block that query block ``i`` can see (hi < lo: none)."""
    lo = 0 if c.left is None else _max(i * c.bq - c.left, 0) // c.bk
    hi = c.nk - 1 if c.right is None else _min(c.nk - 1, (i * c.bq + c.bq - 1 + c.right) // c.bk)
    return lo, hi


def q_range(j, c: Cfg):
    """First and last query block that can see key block ``j``."""
    lo = 0 if c.right is None else _max(j * c.bk - c.right, 0) // c.bq
    hi = c.nq - 1 if c.left is None else _min(c.nq - 1, (j * c.bk + c.bk - 1 + c.left) // c.bq)
    return lo, hi


def kv_steps(c: Cfg) -> int:
    return max(1, max(hi - lo + 1 for lo, hi in map(lambda i: kv_range(i, c), range(c.nq))))


def q_steps(c: Cfg) -> int:
    return max(1, max(hi - lo + 1 for lo, hi in map(lambda j: q_range(j, c), range(c.nk))))


def kv_block(i, jj, c: Cfg):
    """KV block of step ``jj`` of query block ``i`` (clamped: a skipped step re-names the last
    visible block, so its DMA is elided) and whether the step computes."""
    lo, hi = kv_range(i, c)
    return jnp.minimum(lo + jj, hi), lo + jj <= hi


def q_block(j, ii, c: Cfg):
    lo, hi = q_range(j, c)
    return jnp.minimum(lo + ii, hi), lo + ii <= hi


def needs_mask(i, j, c: Cfg):
    """Whether block (i, j) has a masked element (False: the mask arithmetic is skipped)."""
    if c.has_seg:
        return True
    conds = []
    if c.Sp > c.S:
        conds.append(j * c.bk + c.bk > c.S)
    if c.right is not None:  # the block's top-right corner is beyond the right edge
        conds.append(j * c.bk + c.bk - 1 - i * c.bq > c.right)
    if c.left is not None:  # its bottom-left corner is beyond the left edge
        conds.append(i * c.bq + c.bq - 1 - j * c.bk > c.left)
    if not conds:
        return False
    return functools.reduce(jnp.logical_or, conds)


def visible(q0, k0, shape, c: Cfg, *, keys_on_rows: bool, q_seg=None, k_seg=None):
    """Boolean mask of a logits tile whose rows are queries (or keys when ``keys_on_rows``)."""
    rows = lax.broadcasted_iota(jnp.int32, shape, 0)
    cols = lax.broadcasted_iota(jnp.int32, shape, 1)
    qpos, kpos = (cols + q0, rows + k0) if keys_on_rows else (rows + q0, cols + k0)
    mask = None

    def add(m):
        nonlocal mask
        mask = m if mask is None else jnp.logical_and(mask, m)

    if c.Sp > c.S:
        add(kpos < c.S)
    if c.right is not None:
        add(kpos - qpos <= c.right)
    if c.left is not None:
        add(qpos - kpos <= c.left)
    if q_seg is not None:
        add(q_seg == k_seg)
    return mask


def when_masked(run, needs_mask, step):
    """Runs ``step(masked=...)`` under ``run``, with the masked variant only where needed."""
    if needs_mask is False:
        pl.when(run)(lambda: step(False))
    elif needs_mask is True:
        pl.when(run)(lambda: step(True))
    else:
        pl.when(jnp.logical_and(run, needs_mask))(lambda: step(True))
        pl.when(jnp.logical_and(run, jnp.logical_not(needs_mask)))(lambda: step(False))


def cap(s, c: Cfg):
    return s if c.softcap is None else c.softcap * jnp.tanh(s / c.softcap)


def compiler_params(semantics):
    return pltpu.CompilerParams(dimension_semantics=semantics)


def interpret_params(c: Cfg):
    return common.interpret_params("pallas_tpu", c.interpret)
