"""Pieces shared by the Pallas Triton kernels of chunked gated linear attention.

The kernels (``state``, ``forward``, ``backward``) work on padded arrays:
``T`` a multiple of the chunk ``C``, ``K`` and ``V`` multiples of their blocks. Inside a
chunk the log decays become ``b``, the inclusive cumulative sum of ``g`` over the chunk
(float32, non-increasing), and every factor is ``exp`` of a difference ``b_t - b_s`` with
``t >= s`` (so ``<= 0``), masked BEFORE the exponential where ``t < s``.

With the two-level state pass (``Plan.segments > 1``) the stored chunk states are LOCAL:
``S_c = local_c + f_c * seg_p`` where ``p`` is the segment holding chunk ``c``, ``seg_p`` the
true state entering that segment (stored like the chunk states) and ``f_c`` the decay from the segment start to
chunk ``c`` (0-d, or ``[K]`` per channel; 0 across a run change). The per-chunk kernels
complete the state in registers (``completed``) instead of a pass over the stored states;
the state gradients are completed the same way (``seg_p`` the gradient of the state leaving
the segment, ``f_c`` the decay from the end of chunk ``c`` to the segment end).

Per-channel decays (GLA) split a chunk into sub-chunks of ``L`` tokens. A query sub-chunk
``i`` and an earlier key sub-chunk ``j`` meet through ``r_j``, the last token of ``j``:
``exp(b_t - b_s) = exp(b_t - b_{r_j}) * exp(b_{r_j} - b_s)`` with both factors ``<= 1``, so
the pair is one matmul. The diagonal blocks ``i == j`` carry the decay per channel
explicitly (an ``[L, L, BK]`` product). Scalar and no decay use one sub-chunk (``L = C``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from seqmix.kernels.linear_attention.triton.plan import Plan

Array = jax.Array


# --- arithmetic --------------------------------------------------------------------------


def dot(a: Array, b: Array, mma: str, *, trans_a: bool = False, trans_b: bool = False) -> Array:
    """``a @ b`` (optionally transposed operands) with operands cast to ``mma``, f32 result.

    ``"float32"`` is IEEE float32 (no tf32), ``"tfloat32"`` float32 operands through tf32."""
    if mma in ("float32", "tfloat32"):
        return plgpu.dot(
            a.astype(jnp.float32),
            b.astype(jnp.float32),
            trans_a,
            trans_b,
            allow_tf32=mma == "tfloat32",
        )
    dt = jnp.dtype(mma)
    return plgpu.dot(a.astype(dt), b.astype(dt), trans_a, trans_b)


def dot_split(a: Array, b: Array, mma: str, split: bool, *, trans_a: bool = False) -> Array:
    """``dot`` whose float32 first operand (a score matrix) is rounded to ``mma`` in two
    parts, ``a = hi + lo``, when ``split`` and ``mma`` is half precision: two matmuls give
    it ~16 mantissa bits (``b`` is an input, exact in ``mma``)."""
    if not split or mma in ("float32", "tfloat32"):
        return dot(a, b, mma, trans_a=trans_a)
    hi = a.astype(jnp.dtype(mma))
    lo = a - hi.astype(jnp.float32)
    return dot(hi, b, mma, trans_a=trans_a) + dot(lo, b, mma, trans_a=trans_a)


def masked_exp(mask: Array, x: Array) -> Array:
    """``exp(x)`` where ``mask``, else 0; the masked entries never reach the exponential."""
    return jnp.exp(jnp.where(mask, x, -jnp.inf))


def last(b: Array) -> Array:
    """The last entry along axis 0 of a non-increasing ``b`` (a cumulative sum of values
    ``<= 0``): its minimum, bit for bit."""
    return jnp.min(b, axis=0)


def reverse_cumsum(x: Array) -> Array:
    """``y_u = sum_{t >= u} x_t`` along axis 0 (Triton has no reverse scan)."""
    return jnp.sum(x, axis=0, keepdims=True) - jnp.cumsum(x, axis=0) + x


def completed(local: Array, seg: Array, factor) -> Array:
    """``local + factor * seg`` in float32: a chunk's true state (or state gradient) from the
    two-level pass; ``factor`` is 0-d or ``[rows, 1]`` (per channel)."""
    return local.astype(jnp.float32) + factor * seg


def chunk_factor(plan: Plan, f_ref, rows=None):
    """The two-level pass's factor of this program's chunk (grid axis 1): 0-d for scalar or
    no decay (``f_ref`` holds the whole row ``[n]``), ``[rows, 1]`` per channel (``f_ref``
    holds the chunk's ``[K-block]``)."""
    if plan.decay == "channel":
        f = f_ref[...] if rows is None else f_ref[rows]
        return f[:, None]
    return f_ref[pl.program_id(1)]


def causal(n: int) -> Array:
    t = jax.lax.broadcasted_iota(jnp.int32, (n, n), 0)
    s = jax.lax.broadcasted_iota(jnp.int32, (n, n), 1)
    return t >= s


# --- tiles of one chunk --------------------------------------------------------------------


@dataclasses.dataclass
class ChunkRuns:
    """Run ids of one chunk's sub-chunks (``[L]`` each), of the token before the chunk
    (``prev``, 0-d) and of the chunk's last token (``last``, 0-d). None without runs."""

    tiles: list
    prev: Array
    last: Array

    def keep_prev(self, i):
        """``[L]``: tokens of sub-chunk ``i`` that the state entering the chunk reaches."""
        return self.tiles[i] == self.prev

    def keep_last(self, j):
        """``[L]``: tokens of sub-chunk ``j`` that count in the chunk's own state."""
        return self.tiles[j] == self.last

    def carries(self):
        """0-d: whether the state entering the chunk survives to its end."""
        return self.last == self.prev

    def same(self, i, j):
        return self.tiles[i][:, None] == self.tiles[j][None, :]


def load_runs(r_ref, start, size: int, n: int) -> ChunkRuns:
    """Runs of the ``n * size`` tokens from ``start`` (``n`` tiles of ``size``) out of a
    whole-row ``[T]`` ref. The token before the chunk is ``start - 1`` (the first token
    itself for the first chunk: the initial state reaches the first run)."""
    tiles = [r_ref[pl.ds(start + i * size, size)] for i in range(n)]
    prev = r_ref[jnp.maximum(start - 1, 0)]
    return ChunkRuns(tiles, prev, jnp.max(tiles[-1]))


def chunk_runs(plan: Plan, r_ref, start) -> ChunkRuns | None:
    """Runs of the chunk starting at ``start``, tiled by sub-chunks; None without runs."""
    if not plan.has_runs:
        return None
    return load_runs(r_ref, start, plan.sub_chunk, plan.subs)


def intra_mask(plan: Plan, runs: ChunkRuns | None, i: int, j: int):
    """Which (query of sub-chunk i, key of sub-chunk j) pairs interact; None = all."""
    m = causal(plan.sub_chunk) if i == j else None
    if runs is not None:
        same = runs.same(i, j)
        m = same if m is None else m & same
    return m


def scalar_decay(g_ref, rows) -> Array:
    """``b [C]``: inclusive cumsum of a scalar log decay over one chunk."""
    return jnp.cumsum(g_ref[rows].astype(jnp.float32), axis=0)


def channel_decay(plan: Plan, g_ref, cols, offset=0):
    """Per sub-chunk ``b_i [L, BK]`` (cumsum over the whole chunk) and ``e_i [BK]``, the
    value of ``b`` at the last token of sub-chunk ``i`` (``e_{-1}`` is the chunk's last)."""
    L = plan.sub_chunk
    bs, ends = [], []
    off = None
    for i in range(plan.subs):
        gi = g_ref[pl.ds(offset + i * L, L), cols].astype(jnp.float32)
        bi = jnp.cumsum(gi, axis=0)
        if off is not None:
            bi = off[None, :] + bi
        off = last(bi)
        bs.append(bi)
        ends.append(off)
    return bs, ends


def channel_diag(qi: Array, ki: Array, bi: Array, mask: Array) -> Array:
    """``A[t, s] = sum_c q[t,c] k[s,c] exp(b[t,c] - b[s,c])`` over the pairs in ``mask``
    (an ``[L, L]`` bool, causal at least); ``[L, L]`` float32."""
    diff = bi[:, None, :] - bi[None, :, :]
    e = masked_exp(mask[:, :, None], diff)
    return jnp.sum(
        qi.astype(jnp.float32)[:, None, :] * ki.astype(jnp.float32)[None, :, :] * e, axis=2
    )


def attention_blocks(plan: Plan, q_ref, k_ref, g_ref, runs, *, per_block=None, offset=0):
    """The intra-chunk score blocks ``A[(i, j)] [L, L]`` (``j <= i``) of the chunk at rows
    ``offset ... offset + C`` of ``q_ref``/``k_ref`` (and ``g_ref``), summed over the key
    dimension in blocks of ``block_k``, with decay and masks applied (``scale`` not).

    ``A[(i, j)][t, s] = sum_c q_t[c] k_s[c] exp(b_t[c] - b_s[c])`` for allowed pairs, else 0.

    ``per_block(kb, q_tiles, k_tiles, b_tiles, ends)`` is called for every key block with the
    loaded tiles (``b_tiles``/``ends``: per-channel decays for that block; None otherwise)
    so that a kernel can add its own per-block terms in the same pass.
    Returns ``(A, b)`` with ``b`` the scalar decay ``[C]`` (None unless scalar decay).
    """
    L, n, BK = plan.sub_chunk, plan.subs, plan.block_k
    A = {(i, j): jnp.zeros((L, L), jnp.float32) for i in range(n) for j in range(i + 1)}
    b = scalar_decay(g_ref, pl.ds(offset, plan.chunk)) if plan.decay == "scalar" else None
    masks = {(i, j): intra_mask(plan, runs, i, j) for (i, j) in A}
    for kb in range(plan.key_dim // BK):
        cols = pl.ds(kb * BK, BK)
        qt = [q_ref[pl.ds(offset + i * L, L), cols] for i in range(n)]
        kt = [k_ref[pl.ds(offset + i * L, L), cols] for i in range(n)]
        bt = ends = None
        if plan.decay == "channel":
            bt, ends = channel_decay(plan, g_ref, cols, offset)
            for i, j in A:
                if i == j:
                    A[(i, i)] += channel_diag(qt[i], kt[i], bt[i], masks[(i, i)])
                else:
                    qf = qt[i].astype(jnp.float32) * jnp.exp(bt[i] - ends[j][None, :])
                    kf = kt[j].astype(jnp.float32) * jnp.exp(ends[j][None, :] - bt[j])
                    A[(i, j)] += dot(qf, kf, plan.mma, trans_b=True)
        else:
            for i, j in A:
                A[(i, j)] += dot(qt[i], kt[j], plan.mma, trans_b=True)
        if per_block is not None:
            per_block(kb, qt, kt, bt, ends)
    for (i, j), m in masks.items():
        if plan.decay == "scalar":
            A[(i, j)] = A[(i, j)] * masked_exp(m, b[:, None] - b[None, :])
        elif m is not None and not (plan.decay == "channel" and i == j):
            A[(i, j)] = jnp.where(m, A[(i, j)], 0.0)
    return A, b


# --- block specs of the per-chunk kernels ----------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ChunkSpecs:
    """BlockSpecs over a grid ``(x, chunk, batch * v head)`` whose axis 0 walks blocks of
    ``block`` along the key (``axis0 == "k"``) or value (``"v"``) dimension; the other of
    the two dimensions is read whole. q/k specs pick the q/k head of the v head."""

    plan: Plan
    axis0: str
    block: int

    def _k(self):
        return (self.block, lambda x: x) if self.axis0 == "k" else (self.plan.key_dim, lambda x: 0)

    def _v(self):
        return (
            (self.block, lambda x: x) if self.axis0 == "v" else (self.plan.value_dim, lambda x: 0)
        )

    def qk(self):
        (bk, kx), p = self._k(), self.plan
        return pl.BlockSpec(
            (None, p.chunk, None, bk), lambda x, c, bh: (p.heads(bh)[0], c, p.heads(bh)[2], kx(x))
        )

    def v(self):
        """Also the spec of do and of o / dv."""
        (bv, vx), p = self._v(), self.plan
        return pl.BlockSpec(
            (None, p.chunk, None, bv), lambda x, c, bh: (p.heads(bh)[0], c, p.heads(bh)[1], vx(x))
        )

    def g(self, ndim: int):
        """Scalar ``[B, T, Hv]`` or per-channel ``[B, T, Hv, K]`` log decays; also the spec
        of their gradients."""
        (bk, kx), p = self._k(), self.plan
        if ndim == 3:
            return pl.BlockSpec(
                (None, p.chunk, None), lambda x, c, bh: (p.heads(bh)[0], c, p.heads(bh)[1])
            )
        return pl.BlockSpec(
            (None, p.chunk, None, bk), lambda x, c, bh: (p.heads(bh)[0], c, p.heads(bh)[1], kx(x))
        )

    def q_grad(self):
        """dq / dk per v head ``[B, T, Hv, K]`` (summed over groups afterwards)."""
        (bk, kx), p = self._k(), self.plan
        return pl.BlockSpec(
            (None, p.chunk, None, bk), lambda x, c, bh: (p.heads(bh)[0], c, p.heads(bh)[1], kx(x))
        )

    def runs(self):
        p = self.plan
        return pl.BlockSpec((None, p.time), lambda x, c, bh: (p.heads(bh)[0], 0))

    def state(self):
        """Per-chunk states ``[B, Hv, n, K, V]``: the block of chunk c."""
        (bk, kx), (bv, vx), p = self._k(), self._v(), self.plan
        return pl.BlockSpec(
            (None, None, None, bk, bv), lambda x, c, bh: p.heads(bh)[:2] + (c, kx(x), vx(x))
        )

    def segment_state(self):
        """Per-segment states ``[B, Hv, P, K, V]`` (two-level pass): the block of the segment
        holding chunk c."""
        (bk, kx), (bv, vx), p = self._k(), self._v(), self.plan
        return pl.BlockSpec(
            (None, None, None, bk, bv),
            lambda x, c, bh: p.heads(bh)[:2] + (c // p.segment_chunks, kx(x), vx(x)),
        )

    def factor(self):
        """Per-chunk factors of the two-level pass: ``[B, Hv, n]`` (the whole row, read at
        the chunk) or per channel ``[B, Hv, n, K]`` (the chunk's key block)."""
        (bk, kx), p = self._k(), self.plan
        if p.decay == "channel":
            return pl.BlockSpec(
                (None, None, None, bk), lambda x, c, bh: p.heads(bh)[:2] + (c, kx(x))
            )
        return pl.BlockSpec((None, None, p.chunks), lambda x, c, bh: p.heads(bh)[:2] + (0,))
