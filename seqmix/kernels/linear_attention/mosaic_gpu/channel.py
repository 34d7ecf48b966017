"""Intra-chunk terms of per-channel decays (GLA), exact under strong decay.

With ``b [C, K]`` the chunk's inclusive cumulative log decays, the scores are

    A[t, s] = sum_c q[t, c] k[s, c] exp(b[t, c] - b[s, c])      (s <= t, same run)

and no single matmul computes them: ``exp(b_t)`` and ``exp(-b_s)`` separately overflow. The
chunk splits into sub-chunks of ``L = 16`` tokens:

* pairs in different sub-chunks meet through ``r_j``, the last token of the key's
  sub-chunk ``j``: ``exp(b_t - b_s) = exp(b_t - b_{r_j}) exp(b_{r_j} - b_s)`` with both
  factors ``<= 1`` (a factor that underflows belongs to a negligible product). One wgmma per
  key sub-chunk ``j`` (``[C, C]``, contraction over K) of ``Q_j = q * exp(b - b_{r_j})``
  (rows after ``r_j``) and ``K_j = k * exp(b_{r_j} - b)`` (rows of sub-chunk ``j``), both
  staged in SMEM;
* pairs inside a sub-chunk, ``s = t - d`` for ``d = 0 .. L - 1``, are computed elementwise
  from row-shifted views of q, k and b: SMEM holds them untiled with ``L`` rows of padding,
  so the view starting ``d`` rows earlier gives every row ``t`` its partner ``t - d``; the
  ``[C, K]`` products are summed over K into the ``d``-th subdiagonal.

The same decomposition gives the intra-chunk parts of dq and dk from ``dA`` (the masked,
scaled ``do v^T``). Work per chunk: ``2 (C / L - 1) + L`` exponentials of ``[C, K]`` tiles
and ``C / L - 1`` wgmmas per term.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from seqmix.kernels.linear_attention.mosaic_gpu import common as cm

F32 = jnp.float32
SUB = 16  # sub-chunk length L, also the padding rows of the shifted views
# Padding elements before a vector's chunk: TMA writes shared memory at 128-byte aligned
# addresses only (32 float32; 16 would put the chunk at byte 64: a misaligned address).
VEC_PAD = 32


def padded(C: int, K: int, dtype, *, both: bool) -> pl.MemoryRef:
    """Untiled SMEM ``[SUB + C (+ SUB), K]`` whose rows ``SUB .. SUB + C`` hold a chunk."""
    return plgpu.SMEM((C + SUB * (2 if both else 1), K), dtype)


def padded_vector(C: int) -> pl.MemoryRef:
    """Float32 SMEM ``[VEC_PAD + C + VEC_PAD]`` whose elements ``VEC_PAD ..`` hold a chunk."""
    return plgpu.SMEM((C + 2 * VEC_PAD,), F32)


def interior(ref, C: int):
    """The chunk's rows of a ``padded`` buffer (the TMA destination; its ``SUB`` rows of
    at least 64 elements put the chunk at a 128-byte aligned offset)."""
    return ref.at[pl.ds(SUB, C)]


def vector_interior(ref, C: int, d: int = 0):
    """The chunk's elements of a ``padded_vector``, shifted by ``d``."""
    return ref.at[pl.ds(VEC_PAD + d, C)]


def shifted(ref, C: int, d: int) -> jax.Array:
    """``[C, K]`` float32 (WGMMA layout) whose row ``t`` is the chunk's row ``t + d`` (rows
    outside the chunk hold whatever the padding holds: mask them)."""
    return plgpu.load(ref.at[pl.ds(SUB + d, C)], layout=cm.WGMMA, optimized=False).astype(F32)


def chunk_row(ref, r: int) -> jax.Array:
    """Row ``r`` of the chunk as a ``COL`` vector (broadcast along rows)."""
    return plgpu.load(ref.at[SUB + r], layout=cm.COL)


class Chunk:
    """One chunk's operands in padded SMEM: q, k (input dtype), b (float32) and, with
    runs, the run index of every token (``runs``, a padded vector)."""

    def __init__(self, plan, q, k, b, runs):
        self.plan, self.q, self.k, self.b, self.runs = plan, q, k, b, runs
        self.C, self.K = plan.chunk, plan.key_dim
        self.shape = (self.C, self.K)
        self.row = cm.iota(self.shape, 0)

    def tile(self, name: str, d: int = 0) -> jax.Array:
        return shifted(getattr(self, name), self.C, d)

    def pos(self):
        """Position of every row inside its sub-chunk."""
        return jnp.bitwise_and(self.row, SUB - 1)

    def same_run(self, d: int):
        """``[C, K]`` bool: row ``t`` and row ``t + d`` are in the same run (None: no runs)."""
        if self.runs is None:
            return None
        here = plgpu.load(vector_interior(self.runs, self.C), layout=cm.ROW)
        there = plgpu.load(vector_interior(self.runs, self.C, d), layout=cm.ROW)
        return cm.rows(here == there, self.shape)

    def partner(self, d: int):
        """``(valid, factor)`` for the pairs ``(t, t + d)`` inside a sub-chunk: ``valid``
        [C, K] bool and ``factor = exp(b_t - b_{t+d})`` for ``d < 0`` (t the query) or
        ``exp(b_{t+d} - b_t)`` for ``d > 0`` (t the key), 0 where invalid."""
        pos = self.pos()
        valid = pos >= -d if d < 0 else pos < SUB - d
        same = self.same_run(d)
        if same is not None:
            valid = valid & same
        b, bd = self.tile("b"), self.tile("b", d)
        diff = b - bd if d < 0 else bd - b
        return valid, jnp.exp(jnp.where(valid, diff, -jnp.inf))

    def boundary(self, j: int):
        """``(eq, ek)`` of key sub-chunk ``j``: ``exp(b_t - b_r)`` on rows ``t > r`` and
        ``exp(b_r - b_s)`` on rows of sub-chunk ``j`` (``r`` its last row), else 0."""
        r = (j + 1) * SUB - 1
        b = self.tile("b")
        ref = cm.cols(chunk_row(self.b, r), self.shape)
        eq = jnp.exp(jnp.where(self.row > r, b - ref, -jnp.inf))
        in_j = (self.row >= j * SUB) & (self.row <= r)
        ek = jnp.exp(jnp.where(in_j, ref - b, -jnp.inf))
        return eq, ek


def scores(chunk: Chunk, stage_q, stage_k) -> jax.Array:
    """``A [C, C]`` float32 (rows t, columns s) over the causal pairs of the sub-chunk
    decomposition; cross-run pairs are the caller's to mask. ``stage_q`` / ``stage_k``
    are ``[C, K]`` wgmma tiles for the boundary operands."""
    C = chunk.C
    q, k = chunk.tile("q"), chunk.tile("k")
    A = plgpu.layout_cast(jnp.zeros((C, C), F32), cm.WGMMA)
    for j in range(C // SUB - 1):
        eq, ek = chunk.boundary(j)
        stage_q[...] = (q * eq).astype(stage_q.dtype)
        stage_k[...] = (k * ek).astype(stage_k.dtype)
        plgpu.commit_smem()
        A = A + cm.matmul((C, C), (stage_q, stage_k.T))
    r, c = cm.iota((C, C), 0), cm.iota((C, C), 1)
    for d in range(SUB):
        if d == 0:
            prod = q * k
        else:
            valid, factor = chunk.partner(-d)
            prod = jnp.where(valid, q * chunk.tile("k", -d) * factor, 0.0)
        diag = jnp.sum(prod, axis=1)
        A = A + jnp.where(c == r - d, cm.rows(diag, (C, C)), 0.0)
    return A


def subdiagonal(dA: jax.Array, d: int) -> jax.Array:
    """``[C]`` ROW vector: ``dA[t, t - d]`` on row ``t`` (0 where ``t < d``)."""
    C = dA.shape[0]
    r, c = cm.iota((C, C), 0), cm.iota((C, C), 1)
    return jnp.sum(jnp.where(c == r - d, dA, 0.0), axis=1)


def dq_intra(chunk: Chunk, dA: jax.Array, dA_parts, stage) -> jax.Array:
    """``dq_t = sum_s dA[t, s] k_s exp(b_t - b_s)`` (``[C, K]`` float32); ``dA`` the
    masked, scaled ``[C, C]`` float32 and ``dA_parts`` its wgmma tiles (``hi`` or ``hi,
    lo``), ``stage`` a ``[C, K]`` wgmma tile."""
    C, K = chunk.C, chunk.K
    k = chunk.tile("k")
    dq = plgpu.layout_cast(jnp.zeros((C, K), F32), cm.WGMMA)
    for j in range(C // SUB - 1):
        eq, ek = chunk.boundary(j)
        stage[...] = (k * ek).astype(stage.dtype)
        plgpu.commit_smem()
        dq = dq + eq * cm.matmul((C, K), *[(p, stage) for p in dA_parts])
    for d in range(SUB):
        coef = cm.rows(subdiagonal(dA, d), (C, K))
        if d == 0:
            dq = dq + coef * k
        else:
            valid, factor = chunk.partner(-d)
            dq = dq + jnp.where(valid, coef * chunk.tile("k", -d) * factor, 0.0)
    return dq


def dk_intra(chunk: Chunk, dA: jax.Array, dA_parts, stage, vec) -> jax.Array:
    """``dk_s = sum_t dA[t, s] q_t exp(b_t - b_s)`` (``[C, K]`` float32); ``vec`` a
    ``padded_vector`` used to move ``dA[s + d, s]`` onto row ``s``."""
    C, K = chunk.C, chunk.K
    q = chunk.tile("q")
    dk = plgpu.layout_cast(jnp.zeros((C, K), F32), cm.WGMMA)
    for j in range(C // SUB - 1):
        eq, ek = chunk.boundary(j)
        stage[...] = (q * eq).astype(stage.dtype)
        plgpu.commit_smem()
        dk = dk + ek * cm.matmul((C, K), *[(p.T, stage) for p in dA_parts])
    for d in range(SUB):
        if d == 0:
            dk = dk + cm.rows(subdiagonal(dA, 0), (C, K)) * q
            continue
        vector_interior(vec, C)[...] = subdiagonal(dA, d)
        coef = cm.rows(plgpu.load(vector_interior(vec, C, d), layout=cm.ROW), (C, K))
        valid, factor = chunk.partner(d)
        dk = dk + jnp.where(valid, coef * chunk.tile("q", d) * factor, 0.0)
    return dk
