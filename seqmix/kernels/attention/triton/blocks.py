"""The static description of one flash-attention call (Pallas Triton) and the key / query
blocks each program visits.

The loops run only over the blocks the window leaves visible (block sparsity: causal and
local windows cost what they see) and split them into masked edge blocks and unmasked
interior blocks, so fully visible tiles pay no masking. ``segment_ranges`` narrows the range
further for packed sequences (non-decreasing segment ids).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas import triton as plgpu

from seqmix.kernels.attention import tuning

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)


@dataclasses.dataclass(frozen=True)
class Static:
    """Everything static about one call: window, sizes, tiles."""

    left: int | None
    right: int | None
    S: int  # real number of keys (keys >= S are padding)
    groups: int  # query heads per KV head
    scale: float
    softcap: float | None
    segments: bool
    fwd: tuning.Blocks
    bwd: tuning.Blocks
    bwd_dq: tuning.Blocks
    interpret: bool
    precision: lax.Precision | None

    def dot(self, a, b, trans_b=False):
        return plgpu.dot(a, b, trans_b=trans_b, precision=self.precision)

    def logits2(self, s):
        """Raw ``q.k`` -> logits in the log2 domain, and ``tanh`` (for softcap's derivative)."""
        if self.softcap is None:
            return s * (self.scale * LOG2E), None
        t = jnp.tanh(s * (self.scale / self.softcap))
        return t * (self.softcap * LOG2E), t

    def mask(self, diff, kpos, qseg=None, kseg=None):
        """Visibility from ``diff = q_pos - k_pos`` (broadcast shapes), padding and segments."""
        m = kpos < self.S
        if self.left is not None:
            m = m & (diff <= self.left)
        if self.right is not None:
            m = m & (diff >= -self.right)
        if qseg is not None:
            m = m & (qseg == kseg)
        return m

    def reversed_q(self):
        # Heavy query blocks (those that see the most keys under a causal-like mask) first.
        return self.right is not None


def _cdiv(a, b):
    return lax.div(a + (b - 1), b)  # a >= 0


def key_blocks(q0, bq, bk, nk, st):
    """Key blocks of queries ``[q0, q0 + bq)``: visible ``[lo, hi)``, unmasked ``[flo, fhi)``."""
    lo = 0 if st.left is None else lax.div(jnp.maximum(q0 - st.left, 0), bk)
    hi = nk if st.right is None else jnp.minimum(_cdiv(q0 + bq + st.right, bk), nk)
    flo = 0 if st.left is None else _cdiv(jnp.maximum(q0 + bq - 1 - st.left, 0), bk)
    fhi = (
        st.S // bk if st.right is None else jnp.minimum(lax.div(q0 + st.right + 1, bk), st.S // bk)
    )
    flo = jnp.minimum(jnp.maximum(flo, lo), hi)
    fhi = jnp.minimum(jnp.maximum(fhi, flo), hi)
    return lo, hi, flo, fhi


def query_blocks(k0, bk, bq, nq, st):
    """Query blocks that see keys ``[k0, k0 + bk)``: visible and unmasked ranges."""
    lo = 0 if st.right is None else lax.div(jnp.maximum(k0 - st.right, 0), bq)
    hi = nq if st.left is None else jnp.minimum(_cdiv(k0 + bk + st.left, bq), nq)
    flo = 0 if st.right is None else _cdiv(jnp.maximum(k0 + bk - 1 - st.right, 0), bq)
    fhi = nq if st.left is None else lax.div(k0 + st.left + 1, bq)
    # a block holding padded keys is masked (arithmetic, not a scalar where: Triton's
    # lowering of a scalar select with literal operands mistypes them as i1)
    fhi = fhi * (k0 + bk <= st.S).astype(jnp.int32)
    flo = jnp.minimum(jnp.maximum(flo, lo), hi)
    fhi = jnp.minimum(jnp.maximum(fhi, flo), hi)
    return lo, hi, flo, fhi


def loops(lo, hi, flo, fhi, step, carry, st, *, head: bool):
    """Runs ``step(i, carry, masked)`` over masked ``[lo, flo)`` (only when ``head``: the
    far edge of a window), unmasked ``[flo, fhi)`` and masked ``[fhi, hi)``; with segments
    every block is masked."""
    masked = functools.partial(step, masked=True)
    if st.segments:
        return lax.fori_loop(lo, hi, masked, carry)
    if head:
        carry = lax.fori_loop(lo, flo, masked, carry)
    carry = lax.fori_loop(flo, fhi, functools.partial(step, masked=False), carry)
    return lax.fori_loop(fhi, hi, masked, carry)


def segment_ranges(row_ids, col_ids, b_rows, b_cols):
    """For non-decreasing segment ids: per block of ``b_rows`` rows (ids ``row_ids
    [B, R]``), the range of ``b_cols``-blocks of columns (ids ``col_ids [B, C]``) whose ids
    can meet it, ``lo, hi [B, R / b_rows]`` int32 (``hi <= lo``: none). Rows of unsorted ids
    (on either side) get the full range (their blocks are masked, not skipped)."""
    B, R = row_ids.shape
    n_rows, n_cols = R // b_rows, col_ids.shape[1] // b_cols
    rows = row_ids.reshape(B, n_rows, b_rows)
    find = lambda side: jax.vmap(lambda s, v: jnp.searchsorted(s, v, side=side))
    first = find("left")(col_ids, rows[:, :, 0])
    last = find("right")(col_ids, rows[:, :, -1])
    lo, hi = first // b_cols, -(-last // b_cols)
    ascending = lambda x: jnp.all(x[:, 1:] >= x[:, :-1], axis=1)
    sorted_ = (ascending(row_ids) & ascending(col_ids))[:, None]
    lo = jnp.where(sorted_, lo, 0).astype(jnp.int32)
    hi = jnp.where(sorted_, hi, n_cols).astype(jnp.int32)
    return lo, hi
