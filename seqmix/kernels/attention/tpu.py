"""Flash attention for TPU in Pallas (Mosaic): forward and backward kernels.

``attention(q, k, v, *, causal, window, segment_ids, softcap, scale, return_lse)`` computes
``o = softmax(mask(cap(scale * q k^T))) v`` and ``lse = log sum exp(...)`` with the contract of
``seqmix.kernels.attention.api`` (``q [B,T,H,D]``, ``k, v [B,S,Hkv,D]``, ``o`` in q's dtype,
``lse [B,T,H]`` float32, ``o = 0`` and ``lse = -inf`` for a query that sees no key).

Layout. ``[B, T, H, D]`` is viewed (free reshape) as ``[B, T, H*D]``: a ``(block, D)`` tile at
lane offset ``h*D`` is a legal Mosaic block when ``D % 128 == 0``, so q, k, v, o, dq, dk, dv
are never transposed. Other head dims are zero-padded to the next multiple of 128 (the MXU is
128 wide, so a D = 64 contraction costs the same MXU passes as D = 128 anyway). The sequence
is zero-padded to the block size; padded keys are masked, padded queries are sliced away.
Row statistics live as ``[bq, 128]`` lane-broadcast scratch (as in jax's TPU flash attention);
the lse leaves the kernel lane-dense as ``[B, H, 1, T]`` (one ``[bq,128] -> [128,bq]``
transpose per query block), and the backward reads it back the same way. Segment ids are
broadcast to ``[B, T, 128]`` (column use) and ``[B, 8, T]`` (row use) int32.

Grids. Forward and dQ: ``(B, H, T/bq, nkv)`` with semantics (parallel, parallel, parallel,
arbitrary); dK/dV: ``(B, Hkv, S/bk, G, nq)`` (parallel x3, arbitrary x2): the G query heads of
a KV head and their query blocks are reduction axes that accumulate into one resident f32
dK/dV block, so GQA never repeats K/V in memory and dK/dV are summed inside the kernel. Query
head ``h`` reads KV head ``h // G`` through the index maps.

Block sparsity. For causal / windowed attention the KV axis of the grid has only as many
steps as the widest band of visible blocks (``nkv = max_i (hi(i) - lo(i) + 1)``): a 1k window
at T = 32k with 512-blocks runs 3 (causal) or 5 (two-sided) KV steps per query block, not
64. Steps past a query block's last visible block (causal rows near the top) are skipped
with ``pl.when`` and their index map is clamped to the last visible block, so no DMA is
issued for them. Fully visible
blocks skip the mask arithmetic; only diagonal / window-edge / padded blocks build the mask.
Segment ids are data, so they mask but do not skip.

Roofline (bf16, D = 128, bq = bk = 512). Forward FLOPs ``4 B H T S D`` (x the visible
fraction); each (q block, kv step) moves ``2 * bk * D * 2`` bytes of K/V for ``4 bq bk D``
FLOPs: an arithmetic intensity of ``bq = 512`` FLOP/byte, above the ridge of v5e
(197 TFLOP/s / 819 GB/s = 240) and v5p (459 TFLOP/s / 2.76 TB/s = 166), so the kernel is MXU-
and VPU-bound, not HBM-bound. The softmax costs ~10 VPU/EUP ops per logit against 4D = 512
MXU FLOPs per logit; at MXU peak v5e produces ~385 G logits/s, i.e. ~3.9 T VPU ops/s, close to
the VPU's throughput, so expect ~55-65% of MXU peak forward at T >= 2k (v5e ~110-130
TFLOP/s, v5p ~250-300 per chip) and ~45-55% for the backward (dK/dV: 4 matmuls, dQ: 3, so
3.5x the forward FLOPs; intensity 2*bk and 1.5*bq FLOP/byte, also compute-bound). Grid-step
overhead (~0.35 us) is <5% at 512 x 512 blocks. D = 64 pads to 128, so it reaches half the
useful TFLOP/s of D = 128. float16 has no MXU path on v5: it is computed in float32 (cast
in XLA before the kernel), roughly 3x slower than bf16; float32 uses HIGHEST precision
(6 bf16 passes). Sequence padding and the D padding cost one copy of q/k/v (O(T H D)),
negligible against the O(T S H D) kernel at T >= 1k.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from seqmix.kernels.dispatch import interpret_mode

Array = jax.Array

LANES = 128
SUBLANES = 8
NT = (((1,), (1,)), ((), ()))  # a @ b.T
NN = (((1,), (0,)), ((), ()))  # a @ b

# (query block, key block) per padded head dim, the same for fwd, dQ and dK/dV so that one
# padding serves all three kernels. Power-of-two multiples of 128 (lane width). Chosen for
# arithmetic intensity >= the v5e/v5p ridge (see the module docstring) within the 16 MiB
# default scoped VMEM (the dK/dV kernel at D = 256 holds ~9 MiB).
TPU_BLOCKS = {128: (512, 512), 256: (512, 256)}
LARGE_HEAD_BLOCKS = (256, 256)  # Dp > 256
INTERPRET_BLOCKS = (128, 128)  # smallest legal blocks: many grid steps on tiny test shapes


@dataclasses.dataclass(frozen=True)
class _Cfg:
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


# --- block-sparse iteration space ----------------------------------------------------------


def _max(a, b):
    return max(a, b) if isinstance(a, int) and isinstance(b, int) else jnp.maximum(a, b)


def _min(a, b):
    return min(a, b) if isinstance(a, int) and isinstance(b, int) else jnp.minimum(a, b)


def _kv_range(i, c: _Cfg):
    """First and last key block that query block ``i`` can see (hi < lo: none)."""
    lo = 0 if c.left is None else _max(i * c.bq - c.left, 0) // c.bk
    hi = c.nk - 1 if c.right is None else _min(c.nk - 1, (i * c.bq + c.bq - 1 + c.right) // c.bk)
    return lo, hi


def _q_range(j, c: _Cfg):
    """First and last query block that can see key block ``j``."""
    lo = 0 if c.right is None else _max(j * c.bk - c.right, 0) // c.bq
    hi = c.nq - 1 if c.left is None else _min(c.nq - 1, (j * c.bk + c.bk - 1 + c.left) // c.bq)
    return lo, hi


def _kv_steps(c: _Cfg) -> int:
    return max(1, max(hi - lo + 1 for lo, hi in map(lambda i: _kv_range(i, c), range(c.nq))))


def _q_steps(c: _Cfg) -> int:
    return max(1, max(hi - lo + 1 for lo, hi in map(lambda j: _q_range(j, c), range(c.nk))))


def _kv_block(i, jj, c: _Cfg):
    """KV block of step ``jj`` of query block ``i`` (clamped: a skipped step re-names the last
    visible block, so its DMA is elided) and whether the step computes."""
    lo, hi = _kv_range(i, c)
    return jnp.minimum(lo + jj, hi), lo + jj <= hi


def _q_block(j, ii, c: _Cfg):
    lo, hi = _q_range(j, c)
    return jnp.minimum(lo + ii, hi), lo + ii <= hi


def _needs_mask(i, j, c: _Cfg):
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


def _visible(q0, k0, shape, c: _Cfg, *, keys_on_rows: bool, q_seg=None, k_seg=None):
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


def _when_masked(run, needs_mask, step):
    """Runs ``step(masked=...)`` under ``run``, with the masked variant only where needed."""
    if needs_mask is False:
        pl.when(run)(lambda: step(False))
    elif needs_mask is True:
        pl.when(run)(lambda: step(True))
    else:
        pl.when(jnp.logical_and(run, needs_mask))(lambda: step(True))
        pl.when(jnp.logical_and(run, jnp.logical_not(needs_mask)))(lambda: step(False))


def _cap(s, c: _Cfg):
    return s if c.softcap is None else c.softcap * jnp.tanh(s / c.softcap)


def _compiler_params(semantics):
    return pltpu.CompilerParams(dimension_semantics=semantics)


def _interpret(c: _Cfg):
    return pltpu.InterpretParams(detect_races=True) if c.interpret else False


# --- forward kernel --------------------------------------------------------------------------


def _fwd_kernel(*refs, c: _Cfg, nkv: int):
    if c.has_seg:
        q_ref, k_ref, v_ref, sq_ref, sk_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc = refs
    else:
        q_ref, k_ref, v_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc = refs
    i, jj = pl.program_id(2), pl.program_id(3)
    j, run = _kv_block(i, jj, c)

    @pl.when(jj == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    def step(masked: bool):
        q, k, v = q_ref[...], k_ref[...], v_ref[...]
        s = lax.dot_general(q, k, NT, precision=c.precision, preferred_element_type=jnp.float32)
        s = _cap(s * c.scale, c)
        if masked:
            seg = {}
            if c.has_seg:
                seg = dict(q_seg=jnp.tile(sq_ref[...], (1, c.bk // LANES)), k_seg=sk_ref[0:1, :])
            mask = _visible(i * c.bq, j * c.bk, s.shape, c, keys_on_rows=False, **seg)
            s = jnp.where(mask, s, -jnp.inf)
        m_prev, l_prev = m_sc[...], l_sc[...]
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1)[:, None])  # [bq, 128]
        # a fully masked row keeps m = -inf: shift by 0 so exp gives 0, not NaN
        m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new) if masked else m_new
        p = jnp.exp(s - jnp.tile(m_use, (1, c.bk // LANES)))
        alpha = jnp.exp(m_prev - m_use)
        l_sc[...] = alpha * l_prev + jnp.sum(p, axis=1)[:, None]
        m_sc[...] = m_new
        pv = lax.dot_general(
            p.astype(v.dtype), v, NN, precision=c.precision, preferred_element_type=jnp.float32
        )
        acc_sc[...] = acc_sc[...] * jnp.tile(alpha, (1, c.Dp // LANES)) + pv

    _when_masked(run, _needs_mask(i, j, c), step)

    @pl.when(jj == nkv - 1)
    def _finish():
        l, m = l_sc[...], m_sc[...]
        inv = jnp.where(l == 0.0, 0.0, 1.0 / l)
        o_ref[...] = (acc_sc[...] * jnp.tile(inv, (1, c.Dp // LANES))).astype(o_ref.dtype)
        lse = jnp.where(l == 0.0, -jnp.inf, m + jnp.log(l))  # [bq, 128], equal lanes
        lse_ref[...] = lse.T[0:1, :]  # lane-dense [1, bq]


def _seg_arrays(segment_ids, c: _Cfg):
    """Segment ids as [B, L, 128] (one id per row, broadcast on lanes) and [B, 8, L]."""
    L = max(c.Tp, c.Sp)
    seg = jnp.pad(segment_ids.astype(jnp.int32), ((0, 0), (0, L - c.T)), constant_values=-1)
    col = lax.broadcast_in_dim(seg, (c.B, L, LANES), (0, 1))
    row = lax.broadcast_in_dim(seg, (c.B, SUBLANES, L), (0, 2))
    return col, row


def _forward(qk, kk, vk, seg, c: _Cfg):
    """Kernel-layout forward: qk [B,Tp,H*Dp], kk/vk [B,Sp,Hkv*Dp] ->
    o [B,Tp,H*Dp], lse [B,H,1,Tp] (float32)."""
    nkv = _kv_steps(c)
    G = c.G

    def q_map(b, h, i, jj):
        return b, i, h

    def kv_map(b, h, i, jj):
        return b, _kv_block(i, jj, c)[0], h // G

    in_specs = [
        pl.BlockSpec((None, c.bq, c.Dp), q_map),
        pl.BlockSpec((None, c.bk, c.Dp), kv_map),
        pl.BlockSpec((None, c.bk, c.Dp), kv_map),
    ]
    args = [qk, kk, vk]
    if c.has_seg:
        col, row = seg
        in_specs += [
            pl.BlockSpec((None, c.bq, LANES), lambda b, h, i, jj: (b, i, 0)),
            pl.BlockSpec(
                (None, SUBLANES, c.bk), lambda b, h, i, jj: (b, 0, _kv_block(i, jj, c)[0])
            ),
        ]
        args += [col, row]
    visible_frac = nkv / c.nk
    flops = 4 * c.B * c.H * c.Tp * c.Sp * c.Dp * visible_frac
    itemsize = jnp.dtype(c.compute_dtype).itemsize
    o, lse = pl.pallas_call(
        functools.partial(_fwd_kernel, c=c, nkv=nkv),
        grid=(c.B, c.H, c.nq, nkv),
        in_specs=in_specs,
        out_specs=[
            pl.BlockSpec((None, c.bq, c.Dp), q_map),
            pl.BlockSpec((None, None, 1, c.bq), lambda b, h, i, jj: (b, h, 0, i)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((c.B, c.Tp, c.H * c.Dp), jnp.dtype(c.compute_dtype)),
            jax.ShapeDtypeStruct((c.B, c.H, 1, c.Tp), jnp.float32),
        ],
        scratch_shapes=[
            pltpu.VMEM((c.bq, LANES), jnp.float32),
            pltpu.VMEM((c.bq, LANES), jnp.float32),
            pltpu.VMEM((c.bq, c.Dp), jnp.float32),
        ],
        compiler_params=_compiler_params(("parallel", "parallel", "parallel", "arbitrary")),
        cost_estimate=pl.CostEstimate(
            flops=int(flops),
            transcendentals=int(flops / (4 * c.Dp)),
            bytes_accessed=int(itemsize * c.B * c.H * c.Dp * (2 * c.Tp + 2 * c.nq * nkv * c.bk)),
        ),
        interpret=_interpret(c),
        name="seqmix_flash_fwd",
    )(*args)
    return o, lse


# --- backward kernels ------------------------------------------------------------------------


def _dq_kernel(*refs, c: _Cfg, nkv: int):
    if c.has_seg:
        q_ref, k_ref, v_ref, sq_ref, sk_ref, do_ref, lse_ref, dc_ref, dq_ref, acc = refs
    else:
        q_ref, k_ref, v_ref, do_ref, lse_ref, dc_ref, dq_ref, acc = refs
    i, jj = pl.program_id(2), pl.program_id(3)
    j, run = _kv_block(i, jj, c)

    @pl.when(jj == 0)
    def _init():
        acc[...] = jnp.zeros(acc.shape, jnp.float32)

    def step(masked: bool):
        q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
        s_raw = (
            lax.dot_general(q, k, NT, precision=c.precision, preferred_element_type=jnp.float32)
            * c.scale
        )
        s = _cap(s_raw, c)
        if masked:
            seg = {}
            if c.has_seg:
                seg = dict(q_seg=jnp.tile(sq_ref[...], (1, c.bk // LANES)), k_seg=sk_ref[0:1, :])
            mask = _visible(i * c.bq, j * c.bk, s.shape, c, keys_on_rows=False, **seg)
            s = jnp.where(mask, s, -jnp.inf)
        lse = jnp.expand_dims(lse_ref[0], -1)  # [bq, 1]; +inf for rows without keys
        p = jnp.exp(s - lse)
        dp = lax.dot_general(do, v, NT, precision=c.precision, preferred_element_type=jnp.float32)
        ds = p * (dp + jnp.expand_dims(dc_ref[0], -1))  # dc = dlse - rowsum(dO * O)
        if c.softcap is not None:
            t = jnp.tanh(s_raw / c.softcap)
            ds = ds * (1.0 - t * t)
        ds = ds * c.scale
        acc[...] += lax.dot_general(
            ds.astype(k.dtype), k, NN, precision=c.precision, preferred_element_type=jnp.float32
        )

    _when_masked(run, _needs_mask(i, j, c), step)

    @pl.when(jj == nkv - 1)
    def _finish():
        dq_ref[...] = acc[...].astype(dq_ref.dtype)


def _dkv_kernel(*refs, c: _Cfg, nq_steps: int):
    if c.has_seg:
        (
            q_ref,
            k_ref,
            v_ref,
            sq_ref,
            sk_ref,
            do_ref,
            lse_ref,
            dc_ref,
            dk_ref,
            dv_ref,
            dk_acc,
            dv_acc,
        ) = refs
    else:
        q_ref, k_ref, v_ref, do_ref, lse_ref, dc_ref, dk_ref, dv_ref, dk_acc, dv_acc = refs
    j, g, ii = pl.program_id(2), pl.program_id(3), pl.program_id(4)
    i, run = _q_block(j, ii, c)

    @pl.when(jnp.logical_and(g == 0, ii == 0))
    def _init():
        dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
        dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)

    def step(masked: bool):
        # transposed tile: rows are keys, columns queries, so the per-query lse and dc rows
        # broadcast along sublanes and dV/dK are plain (NN) matmuls
        q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
        st_raw = (
            lax.dot_general(k, q, NT, precision=c.precision, preferred_element_type=jnp.float32)
            * c.scale
        )
        st = _cap(st_raw, c)
        if masked:
            seg = {}
            if c.has_seg:
                seg = dict(q_seg=sq_ref[0:1, :], k_seg=jnp.tile(sk_ref[...], (1, c.bq // LANES)))
            mask = _visible(i * c.bq, j * c.bk, st.shape, c, keys_on_rows=True, **seg)
            st = jnp.where(mask, st, -jnp.inf)
        pt = jnp.exp(st - lse_ref[...])  # [bk, bq]
        dv_acc[...] += lax.dot_general(
            pt.astype(do.dtype), do, NN, precision=c.precision, preferred_element_type=jnp.float32
        )
        dpt = lax.dot_general(v, do, NT, precision=c.precision, preferred_element_type=jnp.float32)
        dst = pt * (dpt + dc_ref[...])
        if c.softcap is not None:
            t = jnp.tanh(st_raw / c.softcap)
            dst = dst * (1.0 - t * t)
        dst = dst * c.scale
        dk_acc[...] += lax.dot_general(
            dst.astype(q.dtype), q, NN, precision=c.precision, preferred_element_type=jnp.float32
        )

    _when_masked(run, _needs_mask(i, j, c), step)

    @pl.when(jnp.logical_and(g == c.G - 1, ii == nq_steps - 1))
    def _finish():
        dk_ref[...] = dk_acc[...].astype(dk_ref.dtype)
        dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


def _backward(qk, kk, vk, seg, dok, lse_b, dc, c: _Cfg):
    """Kernel-layout backward -> dq [B,Tp,H*Dp], dk, dv [B,Sp,Hkv*Dp]."""
    G = c.G
    dt = jnp.dtype(c.compute_dtype)
    itemsize = dt.itemsize
    sem3 = ("parallel", "parallel", "parallel", "arbitrary")

    # dQ: same iteration space as the forward
    nkv = _kv_steps(c)

    def q_map(b, h, i, jj):
        return b, i, h

    def kv_map(b, h, i, jj):
        return b, _kv_block(i, jj, c)[0], h // G

    row_map = lambda b, h, i, jj: (b, h, 0, i)
    in_specs = [
        pl.BlockSpec((None, c.bq, c.Dp), q_map),
        pl.BlockSpec((None, c.bk, c.Dp), kv_map),
        pl.BlockSpec((None, c.bk, c.Dp), kv_map),
    ]
    args = [qk, kk, vk]
    if c.has_seg:
        col, row = seg
        in_specs += [
            pl.BlockSpec((None, c.bq, LANES), lambda b, h, i, jj: (b, i, 0)),
            pl.BlockSpec(
                (None, SUBLANES, c.bk), lambda b, h, i, jj: (b, 0, _kv_block(i, jj, c)[0])
            ),
        ]
        args += [col, row]
    in_specs += [
        pl.BlockSpec((None, c.bq, c.Dp), q_map),
        pl.BlockSpec((None, None, 1, c.bq), row_map),
        pl.BlockSpec((None, None, 1, c.bq), row_map),
    ]
    args += [dok, lse_b, dc]
    flops = 6 * c.B * c.H * c.Tp * c.Sp * c.Dp * nkv / c.nk
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, c=c, nkv=nkv),
        grid=(c.B, c.H, c.nq, nkv),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((None, c.bq, c.Dp), q_map),
        out_shape=jax.ShapeDtypeStruct((c.B, c.Tp, c.H * c.Dp), dt),
        scratch_shapes=[pltpu.VMEM((c.bq, c.Dp), jnp.float32)],
        compiler_params=_compiler_params(sem3),
        cost_estimate=pl.CostEstimate(
            flops=int(flops),
            transcendentals=int(flops / (6 * c.Dp)),
            bytes_accessed=int(itemsize * c.B * c.H * c.Dp * (3 * c.Tp + 2 * c.nq * nkv * c.bk)),
        ),
        interpret=_interpret(c),
        name="seqmix_flash_bwd_dq",
    )(*args)

    # dK/dV: per KV head, the group's q heads and the visible q blocks are reduction axes
    nqs = _q_steps(c)

    def qh_map(b, hk, j, g, ii):
        return b, _q_block(j, ii, c)[0], hk * G + g

    def k_map(b, hk, j, g, ii):
        return b, j, hk

    def row_map2(b, hk, j, g, ii):
        return b, hk * G + g, 0, _q_block(j, ii, c)[0]

    in_specs = [
        pl.BlockSpec((None, c.bq, c.Dp), qh_map),
        pl.BlockSpec((None, c.bk, c.Dp), k_map),
        pl.BlockSpec((None, c.bk, c.Dp), k_map),
    ]
    args = [qk, kk, vk]
    if c.has_seg:
        col, row = seg
        in_specs += [
            pl.BlockSpec(
                (None, SUBLANES, c.bq), lambda b, hk, j, g, ii: (b, 0, _q_block(j, ii, c)[0])
            ),
            pl.BlockSpec((None, c.bk, LANES), lambda b, hk, j, g, ii: (b, j, 0)),
        ]
        args += [row, col]
    in_specs += [
        pl.BlockSpec((None, c.bq, c.Dp), qh_map),
        pl.BlockSpec((None, None, 1, c.bq), row_map2),
        pl.BlockSpec((None, None, 1, c.bq), row_map2),
    ]
    args += [dok, lse_b, dc]
    flops = 8 * c.B * c.H * c.Tp * c.Sp * c.Dp * nqs / c.nq
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, c=c, nq_steps=nqs),
        grid=(c.B, c.Hkv, c.nk, G, nqs),
        in_specs=in_specs,
        out_specs=[
            pl.BlockSpec((None, c.bk, c.Dp), k_map),
            pl.BlockSpec((None, c.bk, c.Dp), k_map),
        ],
        out_shape=[jax.ShapeDtypeStruct((c.B, c.Sp, c.Hkv * c.Dp), dt)] * 2,
        scratch_shapes=[
            pltpu.VMEM((c.bk, c.Dp), jnp.float32),
            pltpu.VMEM((c.bk, c.Dp), jnp.float32),
        ],
        compiler_params=_compiler_params(
            ("parallel", "parallel", "parallel", "arbitrary", "arbitrary")
        ),
        cost_estimate=pl.CostEstimate(
            flops=int(flops),
            transcendentals=int(flops / (8 * c.Dp)),
            bytes_accessed=int(
                itemsize * c.B * c.Dp * (4 * c.Hkv * c.Sp + 2 * c.H * c.nk * nqs * c.bq)
            ),
        ),
        interpret=_interpret(c),
        name="seqmix_flash_bwd_dkv",
    )(*args)
    return dq, dk, dv


# --- layout and custom_vjp wiring -------------------------------------------------------------


def _to_kernel(x, L, c: _Cfg):
    """[B, N, Hx, D] -> [B, L, Hx*Dp] in the compute dtype (zero padding)."""
    B, N, Hx, D = x.shape
    x = x.astype(c.compute_dtype)
    if L != N or c.Dp != D:
        x = jnp.pad(x, ((0, 0), (0, L - N), (0, 0), (0, c.Dp - D)))
    return x.reshape(B, L, Hx * c.Dp)


def _from_kernel(x, N, Hx, c: _Cfg, dtype):
    B, L, _ = x.shape
    return x.reshape(B, L, Hx, c.Dp)[:, :N, :, : c.D].astype(dtype)


def _rows_to_kernel(x, c: _Cfg, fill):
    """[B, T, H] float32 -> [B, H, 1, Tp], padded rows = ``fill``."""
    x = jnp.transpose(x, (0, 2, 1))
    x = jnp.pad(x, ((0, 0), (0, 0), (0, c.Tp - c.T)), constant_values=fill)
    return x[:, :, None, :]


def _fwd_impl(q, k, v, segment_ids, c: _Cfg):
    qk, kk, vk = _to_kernel(q, c.Tp, c), _to_kernel(k, c.Sp, c), _to_kernel(v, c.Sp, c)
    seg = _seg_arrays(segment_ids, c) if c.has_seg else None
    ok, lse_k = _forward(qk, kk, vk, seg, c)
    o = _from_kernel(ok, c.T, c.H, c, q.dtype)
    lse = jnp.transpose(lse_k[:, :, 0, : c.T], (0, 2, 1))
    return (o, lse), (qk, kk, vk, seg, o, lse_k)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q, k, v, segment_ids, c: _Cfg):
    return _fwd_impl(q, k, v, segment_ids, c)[0]


def _flash_fwd(q, k, v, segment_ids, c: _Cfg):
    return _fwd_impl(q, k, v, segment_ids, c)


def _flash_bwd(c: _Cfg, res, cts):
    qk, kk, vk, seg, o, lse_k = res
    do, dlse = cts
    delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1)  # [B, T, H]
    dc = _rows_to_kernel(dlse.astype(jnp.float32) - delta, c, 0.0)
    # rows without keys (lse = -inf) and padded rows get lse = +inf: exp(s - lse) = 0, no NaN
    t = jnp.arange(c.Tp)
    lse_b = jnp.where(jnp.isfinite(lse_k) & (t < c.T), lse_k, jnp.inf)
    dok = _to_kernel(do, c.Tp, c)
    dqk, dkk, dvk = _backward(qk, kk, vk, seg, dok, lse_b, dc, c)
    dt = jnp.dtype(c.dtype)
    return (
        _from_kernel(dqk, c.T, c.H, c, dt),
        _from_kernel(dkk, c.S, c.Hkv, c, dt),
        _from_kernel(dvk, c.S, c.Hkv, c, dt),
        None,
    )


_flash.defvjp(_flash_fwd, _flash_bwd)


def _pick_block(n: int, target: int) -> int:
    """Largest power-of-two multiple of 128 <= target whose padding of ``n`` is <= n/8."""
    b = target
    while b > LANES and (b >= 2 * _round_up(n, LANES) or _round_up(n, b) - n > n // 8):
        b //= 2
    return b


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    causal: bool,
    window: tuple[int | None, int | None],
    segment_ids: Array | None,
    softcap: float | None,
    scale: float,
    return_lse: bool,
    block_sizes: tuple[int, int] | None = None,
) -> tuple[Array, Array | None]:
    """Flash attention on TPU (Pallas Mosaic); see the module docstring.

    Args:
      q: ``[B, T, H, D]``; k, v: ``[B, S, Hkv, D]`` (``H % Hkv == 0``), one float dtype.
      causal, window, segment_ids, softcap, scale, return_lse: as ``api.attention`` after
        normalisation (``window = (left, right)``, ``None`` = unbounded side).
      block_sizes: ``(block_q, block_k)`` multiples of 128 overriding ``TPU_BLOCKS``.

    Returns:
      ``(o [B,T,H,D] in q's dtype, lse [B,T,H] float32 or None)``; differentiable in q, k, v
      (and through lse).
    """
    if jnp.dtype(q.dtype) == jnp.float64:
        raise NotImplementedError("pallas_tpu attention: float64 is not supported on TPU")
    B, T, H, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    left, right = window
    if causal:
        right = 0
    Dp = _round_up(D, LANES)
    if block_sizes is not None:
        bq, bk = block_sizes
        if bq % LANES or bk % LANES:
            raise ValueError(f"block_sizes must be multiples of {LANES}, got {block_sizes}")
    elif interpret_mode():
        bq, bk = INTERPRET_BLOCKS
    else:
        bq, bk = TPU_BLOCKS.get(Dp, LARGE_HEAD_BLOCKS)
        bq, bk = _pick_block(T, bq), _pick_block(S, bk)
    dtype = jnp.dtype(q.dtype).name
    c = _Cfg(
        B=B,
        T=T,
        S=S,
        H=H,
        Hkv=Hkv,
        D=D,
        Dp=Dp,
        Tp=_round_up(T, bq),
        Sp=_round_up(S, bk),
        bq=bq,
        bk=bk,
        causal=bool(causal),
        left=left,
        right=right,
        softcap=softcap,
        scale=float(scale),
        has_seg=segment_ids is not None,
        dtype=dtype,
        compute_dtype="float32" if dtype == "float16" else dtype,
        interpret=interpret_mode(),
    )
    o, lse = _flash(q, k, v, segment_ids, c)
    return o, (lse if return_lse else None)
