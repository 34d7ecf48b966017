"""Flash attention in Pallas, lowered through Triton (GPU): forward and backward kernels.

``o = softmax(c * tanh(scale * q k^T / c) + mask) v`` (no tanh without ``softcap=c``) with
``q [B, T, H, D]``, ``k, v [B, S, Hkv, D]``, query head ``h`` reading KV head ``h // G``
(``G = H / Hkv``), and the natural log-sum-exp ``lse [B, T, H]`` (float32).

Forward (FlashAttention-2): one program per ``(query block, batch, head)``; the query tile
stays in registers while K/V tiles stream through an online softmax in the exp2 domain.
The loop runs only over the key blocks the window leaves visible (block sparsity: causal
and local windows cost what they see) and is split into masked edge blocks and unmasked
interior blocks, so fully visible tiles pay no masking.

Backward: a row-wise ``delta = sum(dO * O) - dlse`` kernel, then
- a dK/dV kernel: one program per ``(key block, batch, KV head)``; the K/V tile stays
  resident while it walks the visible query tiles of every query head of its group (GQA
  without repeating K/V and without atomics), ``ds = p * (dp - delta)``;
- a dQ kernel shaped like the forward.
The ``dlse`` term makes the gradient of a returned lse exact (``d lse / d s = p``).
``softcap`` multiplies ``ds`` by ``1 - tanh^2``.

Any ``T``, ``S``: inputs are zero-padded to block multiples (padded keys masked, padded
query rows sliced off); head dims are padded to a power of two >= 16. bf16, fp16 and fp32
inputs; accumulation is float32 (fp32 inputs use IEEE dots, not tf32). Tile sizes come
from ``tuning.attention_blocks``.

``segment_ids`` mask across segments; for non-decreasing ids (packed sequences) each block
also skips the blocks of other segments (a row whose ids are not sorted is masked only).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from seqmix.kernels.attention import tuning
from seqmix.kernels.dispatch import interpret_mode

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)


@dataclasses.dataclass(frozen=True)
class _Static:
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


def _key_blocks(q0, bq, bk, nk, st):
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


def _query_blocks(k0, bk, bq, nq, st):
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


def _loops(lo, hi, flo, fhi, step, carry, st, *, head: bool):
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


# --- forward -------------------------------------------------------------------------------


def _fwd_kernel(q_ref, k_ref, v_ref, *refs, st, nq, nk):
    if st.segments:
        qseg_ref, kseg_ref, lo_ref, hi_ref, o_ref, lse_ref = refs
    else:
        o_ref, lse_ref = refs
    bq, bk = st.fwd.block_q, st.fwd.block_k
    i = pl.program_id(0)
    i = nq - 1 - i if st.reversed_q() else i
    q0 = i * bq
    q = q_ref[...]
    qpos = q0 + jnp.arange(bq, dtype=jnp.int32)
    qseg = qseg_ref[...][:, None] if st.segments else None

    def step(j, carry, masked):
        acc, m, l = carry
        k0 = pl.multiple_of(j * bk, bk)
        k = k_ref[pl.ds(k0, bk), :]
        v = v_ref[pl.ds(k0, bk), :]
        s, _ = st.logits2(st.dot(q, k, trans_b=True))  # [bq, bk]
        if masked:
            kpos = k0 + jnp.arange(bk, dtype=jnp.int32)
            kseg = kseg_ref[pl.ds(k0, bk)][None, :] if st.segments else None
            vis = st.mask(qpos[:, None] - kpos[None, :], kpos[None, :], qseg, kseg)
            s = jnp.where(vis, s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        # a row that has seen no key yet keeps m = -inf: shift by 0 so exp2 gives 0, not NaN
        m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new) if masked else m_new
        corr = jnp.exp2(m - m_use)
        p = jnp.exp2(s - m_use[:, None])
        l = l * corr + jnp.sum(p, axis=1)
        acc = acc * corr[:, None] + st.dot(p.astype(v.dtype), v)
        return acc, m_new, l

    lo, hi, flo, fhi = _key_blocks(q0, bq, bk, nk, st)
    if st.segments:
        lo, hi = jnp.maximum(lo, lo_ref[i]), jnp.minimum(hi, hi_ref[i])
    init = (
        jnp.zeros((bq, q.shape[-1]), jnp.float32),
        jnp.full((bq,), -jnp.inf, jnp.float32),
        jnp.zeros((bq,), jnp.float32),
    )
    acc, m, l = _loops(lo, hi, flo, fhi, step, init, st, head=st.left is not None)
    seen = l > 0
    l_safe = jnp.where(seen, l, 1.0)
    plgpu.store(o_ref, (acc / l_safe[:, None]).astype(o_ref.dtype))
    # log2-domain lse; +inf marks a row that sees no key (its p is 0 in the backward)
    plgpu.store(lse_ref, jnp.where(seen, m + jnp.log2(l_safe), jnp.inf))


def _forward(q, k, v, seg, st):
    B, T, H, D = q.shape
    S = k.shape[1]
    G = st.groups
    bq, bk = st.fwd.block_q, st.fwd.block_k
    nq, nk = T // bq, S // bk
    qi = (lambda i: nq - 1 - i) if st.reversed_q() else (lambda i: i)
    in_specs = [
        pl.BlockSpec((None, bq, None, D), lambda i, b, h: (b, qi(i), h, 0)),
        pl.BlockSpec((None, S, None, D), lambda i, b, h: (b, 0, h // G, 0)),
        pl.BlockSpec((None, S, None, D), lambda i, b, h: (b, 0, h // G, 0)),
    ]
    args = [q, k, v]
    if st.segments:
        lo, hi = _segment_ranges(seg, bq, bk)
        in_specs += [
            pl.BlockSpec((None, bq), lambda i, b, h: (b, qi(i))),
            pl.BlockSpec((None, S), lambda i, b, h: (b, 0)),
            pl.BlockSpec((None, nq), lambda i, b, h: (b, 0)),
            pl.BlockSpec((None, nq), lambda i, b, h: (b, 0)),
        ]
        args += [seg, seg, lo, hi]
    return pl.pallas_call(
        functools.partial(_fwd_kernel, st=st, nq=nq, nk=nk),
        grid=(nq, B, H),
        in_specs=in_specs,
        out_specs=[
            pl.BlockSpec((None, bq, None, D), lambda i, b, h: (b, qi(i), h, 0)),
            pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, qi(i))),
        ],
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((B, H, T), jnp.float32),
        ],
        compiler_params=plgpu.CompilerParams(
            num_warps=st.fwd.num_warps, num_stages=st.fwd.num_stages
        ),
        interpret=st.interpret,
        name="seqmix_flash_fwd",
    )(*args)


def _segment_ranges(seg, b_rows, b_cols):
    """For non-decreasing segment ids: per block of ``b_rows`` rows, the range of
    ``b_cols``-blocks whose ids can meet it, ``lo, hi [B, n_rows]`` int32. A row of
    unsorted ids gets the full range (its blocks are masked, not skipped)."""
    B, L = seg.shape
    n_rows, n_cols = L // b_rows, L // b_cols
    rows = seg.reshape(B, n_rows, b_rows)
    first = jax.vmap(lambda s, v: jnp.searchsorted(s, v, side="left"))(seg, rows[:, :, 0])
    last = jax.vmap(lambda s, v: jnp.searchsorted(s, v, side="right"))(seg, rows[:, :, -1])
    lo, hi = first // b_cols, -(-last // b_cols)
    sorted_ = jnp.all(seg[:, 1:] >= seg[:, :-1], axis=1)[:, None]
    lo = jnp.where(sorted_, lo, 0).astype(jnp.int32)
    hi = jnp.where(sorted_, hi, n_cols).astype(jnp.int32)
    return lo, hi


# --- backward ------------------------------------------------------------------------------


def _delta_kernel(o_ref, do_ref, dlse_ref, delta_ref):
    o = o_ref[...].astype(jnp.float32)
    do = do_ref[...].astype(jnp.float32)
    plgpu.store(delta_ref, jnp.sum(o * do, axis=1) - dlse_ref[...])


def _delta(o, do, dlse, st):
    """``sum(dO * O) - dlse`` per row, ``[B, H, T]`` float32."""
    B, T, H, D = o.shape
    bq = st.bwd_dq.block_q
    spec = pl.BlockSpec((None, bq, None, D), lambda i, b, h: (b, i, h, 0))
    row = pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i))
    return pl.pallas_call(
        _delta_kernel,
        grid=(T // bq, B, H),
        in_specs=[spec, spec, row],
        out_specs=row,
        out_shape=jax.ShapeDtypeStruct((B, H, T), jnp.float32),
        compiler_params=plgpu.CompilerParams(
            num_warps=st.bwd_dq.num_warps, num_stages=st.bwd_dq.num_stages
        ),
        interpret=st.interpret,
        name="seqmix_flash_bwd_delta",
    )(o, do, dlse)


def _dkdv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, st, nq):
    if st.segments:
        seg_ref, lo_ref, hi_ref, dk_ref, dv_ref = refs
    else:
        dk_ref, dv_ref = refs
    bq, bk = st.bwd.block_q, st.bwd.block_k
    j = pl.program_id(0)
    k0 = j * bk
    k = k_ref[...]
    v = v_ref[...]
    kpos = k0 + jnp.arange(bk, dtype=jnp.int32)
    kseg = seg_ref[pl.ds(k0, bk)][:, None] if st.segments else None

    def step(i, carry, g, masked):
        dk, dv = carry
        q0 = pl.multiple_of(i * bq, bq)
        q = q_ref[pl.ds(q0, bq), g, :]
        do = do_ref[pl.ds(q0, bq), g, :]
        lse = lse_ref[g, pl.ds(q0, bq)]
        delta = delta_ref[g, pl.ds(q0, bq)]
        s, t = st.logits2(st.dot(k, q, trans_b=True))  # transposed logits [bk, bq]
        if masked:
            qpos = q0 + jnp.arange(bq, dtype=jnp.int32)
            qseg = seg_ref[pl.ds(q0, bq)][None, :] if st.segments else None
            vis = st.mask(qpos[None, :] - kpos[:, None], kpos[:, None], qseg, kseg)
            s = jnp.where(vis, s, -jnp.inf)
        p = jnp.exp2(s - lse[None, :])
        dv = dv + st.dot(p.astype(do.dtype), do)
        ds = p * (st.dot(v, do, trans_b=True) - delta[None, :])
        if t is not None:
            ds = ds * (1.0 - t * t)
        dk = dk + st.dot(ds.astype(q.dtype), q)
        return dk, dv

    lo, hi, flo, fhi = _query_blocks(k0, bk, bq, nq, st)
    if st.segments:
        lo, hi = jnp.maximum(lo, lo_ref[j]), jnp.minimum(hi, hi_ref[j])

    def group(g, carry):
        return _loops(
            lo, hi, flo, fhi, functools.partial(step, g=g), carry, st, head=st.right is not None
        )

    D = k.shape[-1]
    init = (jnp.zeros((bk, D), jnp.float32), jnp.zeros((bk, D), jnp.float32))
    dk, dv = group(0, init) if st.groups == 1 else lax.fori_loop(0, st.groups, group, init)
    plgpu.store(dk_ref, (dk * st.scale).astype(dk_ref.dtype))
    plgpu.store(dv_ref, dv.astype(dv_ref.dtype))


def _dkdv(q, k, v, do, lse2, delta, seg, st):
    B, T, _H, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    G = st.groups
    bq, bk = st.bwd.block_q, st.bwd.block_k
    nq, nk = T // bq, S // bk
    kv = pl.BlockSpec((None, bk, None, D), lambda j, b, h: (b, j, h, 0))
    qs = pl.BlockSpec((None, T, G, D), lambda j, b, h: (b, 0, h, 0))
    rows = pl.BlockSpec((None, G, T), lambda j, b, h: (b, h, 0))
    in_specs = [qs, kv, kv, qs, rows, rows]
    args = [q, k, v, do, lse2, delta]
    if st.segments:
        lo, hi = _segment_ranges(seg, bk, bq)
        in_specs += [
            pl.BlockSpec((None, T), lambda j, b, h: (b, 0)),
            pl.BlockSpec((None, nk), lambda j, b, h: (b, 0)),
            pl.BlockSpec((None, nk), lambda j, b, h: (b, 0)),
        ]
        args += [seg, lo, hi]
    return pl.pallas_call(
        functools.partial(_dkdv_kernel, st=st, nq=nq),
        grid=(nk, B, Hkv),
        in_specs=in_specs,
        out_specs=[kv, kv],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=plgpu.CompilerParams(
            num_warps=st.bwd.num_warps, num_stages=st.bwd.num_stages
        ),
        interpret=st.interpret,
        name="seqmix_flash_bwd_dkdv",
    )(*args)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, st, nq, nk):
    if st.segments:
        qseg_ref, kseg_ref, lo_ref, hi_ref, dq_ref = refs
    else:
        (dq_ref,) = refs
    bq, bk = st.bwd_dq.block_q, st.bwd_dq.block_k
    i = pl.program_id(0)
    i = nq - 1 - i if st.reversed_q() else i
    q0 = i * bq
    q = q_ref[...]
    do = do_ref[...]
    lse = lse_ref[...]
    delta = delta_ref[...]
    qpos = q0 + jnp.arange(bq, dtype=jnp.int32)
    qseg = qseg_ref[...][:, None] if st.segments else None

    def step(j, dq, masked):
        k0 = pl.multiple_of(j * bk, bk)
        k = k_ref[pl.ds(k0, bk), :]
        v = v_ref[pl.ds(k0, bk), :]
        s, t = st.logits2(st.dot(q, k, trans_b=True))
        if masked:
            kpos = k0 + jnp.arange(bk, dtype=jnp.int32)
            kseg = kseg_ref[pl.ds(k0, bk)][None, :] if st.segments else None
            vis = st.mask(qpos[:, None] - kpos[None, :], kpos[None, :], qseg, kseg)
            s = jnp.where(vis, s, -jnp.inf)
        p = jnp.exp2(s - lse[:, None])
        ds = p * (st.dot(do, v, trans_b=True) - delta[:, None])
        if t is not None:
            ds = ds * (1.0 - t * t)
        return dq + st.dot(ds.astype(k.dtype), k)

    lo, hi, flo, fhi = _key_blocks(q0, bq, bk, nk, st)
    if st.segments:
        lo, hi = jnp.maximum(lo, lo_ref[i]), jnp.minimum(hi, hi_ref[i])
    dq = _loops(
        lo, hi, flo, fhi, step, jnp.zeros(q.shape, jnp.float32), st, head=st.left is not None
    )
    plgpu.store(dq_ref, (dq * st.scale).astype(dq_ref.dtype))


def _dq(q, k, v, do, lse2, delta, seg, st):
    B, T, H, D = q.shape
    S = k.shape[1]
    G = st.groups
    bq, bk = st.bwd_dq.block_q, st.bwd_dq.block_k
    nq, nk = T // bq, S // bk
    qi = (lambda i: nq - 1 - i) if st.reversed_q() else (lambda i: i)
    qs = pl.BlockSpec((None, bq, None, D), lambda i, b, h: (b, qi(i), h, 0))
    kv = pl.BlockSpec((None, S, None, D), lambda i, b, h: (b, 0, h // G, 0))
    rows = pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, qi(i)))
    in_specs = [qs, kv, kv, qs, rows, rows]
    args = [q, k, v, do, lse2, delta]
    if st.segments:
        lo, hi = _segment_ranges(seg, bq, bk)
        in_specs += [
            pl.BlockSpec((None, bq), lambda i, b, h: (b, qi(i))),
            pl.BlockSpec((None, S), lambda i, b, h: (b, 0)),
            pl.BlockSpec((None, nq), lambda i, b, h: (b, 0)),
            pl.BlockSpec((None, nq), lambda i, b, h: (b, 0)),
        ]
        args += [seg, seg, lo, hi]
    return pl.pallas_call(
        functools.partial(_dq_kernel, st=st, nq=nq, nk=nk),
        grid=(nq, B, H),
        in_specs=in_specs,
        out_specs=qs,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=plgpu.CompilerParams(
            num_warps=st.bwd_dq.num_warps, num_stages=st.bwd_dq.num_stages
        ),
        interpret=st.interpret,
        name="seqmix_flash_bwd_dq",
    )(*args)


# --- custom_vjp wiring and the public entry points ------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q, k, v, seg, st):
    return _flash_fwd(q, k, v, seg, st)[0]


def _flash_fwd(q, k, v, seg, st):
    o, lse2 = _forward(q, k, v, seg, st)
    lse = jnp.where(lse2 == jnp.inf, -jnp.inf, lse2 * LN2)
    return (o, lse), (q, k, v, seg, o, lse2)


def _flash_bwd(st, res, cts):
    q, k, v, seg, o, lse2 = res
    do, dlse = cts
    dlse = jnp.where(lse2 == jnp.inf, 0.0, dlse.astype(jnp.float32))
    delta = _delta(o, do, dlse, st)
    dk, dv = _dkdv(q, k, v, do, lse2, delta, seg, st)
    dq = _dq(q, k, v, do, lse2, delta, seg, st)
    return dq, dk, dv, None


_flash.defvjp(_flash_fwd, _flash_bwd)
_flash_jit = jax.jit(_flash, static_argnums=(4,))  # eager callers trace the kernels once


def _fit(blocks: tuning.Blocks, T: int, S: int) -> tuning.Blocks:
    """Shrinks a tile to the problem (powers of two, at least 16)."""
    cap = lambda n, b: min(b, max(16, 1 << max(n - 1, 0).bit_length()))
    return dataclasses.replace(
        blocks, block_q=cap(T, blocks.block_q), block_k=cap(S, blocks.block_k)
    )


def flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    window: tuple[int | None, int | None] = (None, None),
    segment_ids: jax.Array | None = None,
    softcap: float | None = None,
    scale: float | None = None,
    blocks: dict[str, tuning.Blocks] | None = None,
    interpret: bool | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Flash attention, differentiable in ``q, k, v``: returns ``(o [B,T,H,D] in q's dtype,
    lse [B,T,H] float32)``. ``window = (left, right)`` as in ``api.normalize_window``
    (``(None, 0)`` is causal). ``blocks`` overrides tiles per kind (``"fwd"``, ``"bwd"``,
    ``"bwd_dq"``); ``interpret`` defaults to ``dispatch.interpret_mode()``."""
    _B, T, H, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    if H % Hkv or k.shape != v.shape or k.shape[::3] != q.shape[::3]:
        raise ValueError(
            f"q {q.shape} and k, v {k.shape}, {v.shape}: expected [B, T, H, D] "
            "and [B, S, Hkv, D] with H a multiple of Hkv"
        )
    interpret = interpret_mode() if interpret is None else interpret
    scale = D**-0.5 if scale is None else scale
    blocks = dict(blocks or {})
    Dp = tuning.head_dim_bucket(D)
    tiles = {}
    for kind in ("fwd", "bwd", "bwd_dq"):
        b = blocks.get(kind) or tuning.attention_blocks(Dp, q.dtype, kind=kind, interpret=interpret)
        tiles[kind] = _fit(b, T, S)
    q_mult = max(b.block_q for b in tiles.values())
    k_mult = max(b.block_k for b in tiles.values())
    if segment_ids is not None:
        q_mult = k_mult = max(q_mult, k_mult)  # one padded length for both sides
    Tp, Sp = -(-T // q_mult) * q_mult, -(-S // k_mult) * k_mult
    q = jnp.pad(q, ((0, 0), (0, Tp - T), (0, 0), (0, Dp - D)))
    k = jnp.pad(k, ((0, 0), (0, Sp - S), (0, 0), (0, Dp - D)))
    v = jnp.pad(v, ((0, 0), (0, Sp - S), (0, 0), (0, Dp - D)))
    seg = None
    if segment_ids is not None:
        seg = jnp.pad(segment_ids.astype(jnp.int32), ((0, 0), (0, Tp - T)), mode="edge")
    left, right = window
    st = _Static(
        left=left,
        right=right,
        S=S,
        groups=H // Hkv,
        scale=float(scale),
        softcap=None if softcap is None else float(softcap),
        segments=seg is not None,
        fwd=tiles["fwd"],
        bwd=tiles["bwd"],
        bwd_dq=tiles["bwd_dq"],
        interpret=interpret,
        precision=lax.Precision.HIGHEST if q.dtype == jnp.float32 else None,
    )
    o, lse = _flash_jit(q, k, v, seg, st)
    return o[:, :T, :, :D], jnp.transpose(lse[:, :, :T], (0, 2, 1))


def attention(q, k, v, *, causal, window, segment_ids, softcap, scale, return_lse):
    """The ``pallas_triton`` implementation of ``seqmix.kernels.attention`` (normalised
    arguments, see ``api.py``): returns ``(o, lse)``, lse ``None`` unless ``return_lse``."""
    if not any(q.dtype == jnp.dtype(d) for d in DTYPES):
        raise NotImplementedError(
            f"pallas_triton attention takes bfloat16, float16 or float32 inputs, got {q.dtype}"
        )
    if q.shape[-1] > 256:
        raise NotImplementedError(
            f"pallas_triton attention supports head dims up to 256, got {q.shape[-1]}"
        )
    if causal and window[1] != 0:
        raise ValueError(f"causal attention needs window right = 0, got window={window}")
    o, lse = flash_attention(
        q, k, v, window=window, segment_ids=segment_ids, softcap=softcap, scale=scale
    )
    return o, (lse if return_lse else None)
