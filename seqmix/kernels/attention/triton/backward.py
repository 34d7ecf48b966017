"""The flash-attention backward kernels (Pallas Triton).

A row-wise ``delta = sum(dO * O) - dlse`` kernel, then
- a dK/dV kernel: one program per ``(key block, batch, KV head)``; the K/V tile stays
  resident while it walks the visible query tiles of every query head of its group (GQA
  without repeating K/V and without atomics), ``ds = p * (dp - delta)``;
- a dQ kernel shaped like the forward.
The ``dlse`` term makes the gradient of a returned lse exact (``d lse / d s = p``).
``softcap`` multiplies ``ds`` by ``1 - tanh^2``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from seqmix.kernels.attention.triton.blocks import (
    key_blocks,
    loops,
    query_blocks,
    segment_ranges,
)


def _finite(x):
    """``x`` with its non-finite entries zeroed."""
    return jnp.where(jnp.abs(x.astype(jnp.float32)) < jnp.inf, x, jnp.zeros_like(x))


def _delta_kernel(o_ref, do_ref, dlse_ref, delta_ref):
    o = o_ref[...].astype(jnp.float32)
    do = do_ref[...].astype(jnp.float32)
    ok = jnp.min(jnp.where(jnp.abs(o) < jnp.inf, 1.0, 0.0), axis=1) > 0
    plgpu.store(delta_ref, jnp.where(ok, jnp.sum(o * do, axis=1) - dlse_ref[...], jnp.inf))


def delta(o, do, dlse, st):
    """``sum(dO * O) - dlse`` per row, ``[B, H, T]`` float32; ``+inf`` marks a row whose
    output is not finite (it attended a non-finite key or value): such a row passes no
    gradient, as ``where`` would (``drop_dead_rows``)."""
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


def drop_dead_rows(q, do, lse2, delta):
    """The rows that ``delta`` marks (+inf) pass no gradient: their q and dO zeroed (one XLA
    pass over q and dO), ``lse2 = +inf`` (so ``p = 0``, as for a row that sees no key) and
    ``delta = 0``. With the non-finite entries of k and v zeroed where a tile loads them
    under a mask (an unmasked tile's keys are seen by all its rows: a bad one there makes
    them all dead), a NaN or Inf at a masked position reaches no gradient, and the inner
    loops of the dK/dV and dQ kernels are those of finite inputs."""
    dead = delta == jnp.inf  # [B, H, T]
    rows = jnp.swapaxes(dead, 1, 2)[..., None]  # [B, T, H, 1]
    q = jnp.where(rows, jnp.zeros((), q.dtype), q)
    do = jnp.where(rows, jnp.zeros((), do.dtype), do)
    return q, do, jnp.where(dead, jnp.inf, lse2), jnp.where(dead, 0.0, delta)


def _dkdv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, st, nq):
    if st.segments:
        qseg_ref, kseg_ref, lo_ref, hi_ref, dk_ref, dv_ref = refs
    else:
        dk_ref, dv_ref = refs
    bq, bk = st.bwd.block_q, st.bwd.block_k
    j = pl.program_id(0)
    k0 = j * bk
    k = _finite(k_ref[...])
    v = _finite(v_ref[...])
    kpos = k0 + jnp.arange(bk, dtype=jnp.int32)
    kseg = kseg_ref[pl.ds(k0, bk)][:, None] if st.segments else None

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
            qseg = qseg_ref[pl.ds(q0, bq)][None, :] if st.segments else None
            vis = st.mask(qpos[None, :] - kpos[:, None], kpos[:, None], qseg, kseg)
            s = jnp.where(vis, s, -jnp.inf)
        p = jnp.exp2(s - lse[None, :])
        dv = dv + st.dot(p.astype(do.dtype), do)
        ds = p * (st.dot(v, do, trans_b=True) - delta[None, :])
        if t is not None:
            ds = ds * (1.0 - t * t)
        dk = dk + st.dot(ds.astype(q.dtype), q)
        return dk, dv

    lo, hi, flo, fhi = query_blocks(k0, bk, bq, nq, st)
    if st.segments:
        lo, hi = jnp.maximum(lo, lo_ref[j]), jnp.minimum(hi, hi_ref[j])

    def group(g, carry):
        return loops(
            lo, hi, flo, fhi, functools.partial(step, g=g), carry, st, head=st.right is not None
        )

    D = k.shape[-1]
    init = (jnp.zeros((bk, D), jnp.float32), jnp.zeros((bk, D), jnp.float32))
    dk, dv = group(0, init) if st.groups == 1 else lax.fori_loop(0, st.groups, group, init)
    plgpu.store(dk_ref, (dk * st.scale).astype(dk_ref.dtype))
    plgpu.store(dv_ref, dv.astype(dv_ref.dtype))


def dkdv(q, k, v, do, lse2, delta, qseg, kseg, st):
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
        lo, hi = segment_ranges(kseg, qseg, bk, bq)
        in_specs += [
            pl.BlockSpec((None, T), lambda j, b, h: (b, 0)),
            pl.BlockSpec((None, S), lambda j, b, h: (b, 0)),
            pl.BlockSpec((None, nk), lambda j, b, h: (b, 0)),
            pl.BlockSpec((None, nk), lambda j, b, h: (b, 0)),
        ]
        args += [qseg, kseg, lo, hi]
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
    lse = lse_ref[...]
    delta = delta_ref[...]
    do = do_ref[...]
    qpos = q0 + jnp.arange(bq, dtype=jnp.int32)
    qseg = qseg_ref[...][:, None] if st.segments else None

    def step(j, dq, masked):
        k0 = pl.multiple_of(j * bk, bk)
        k = k_ref[pl.ds(k0, bk), :]
        v = v_ref[pl.ds(k0, bk), :]
        if masked:  # a masked key's NaN or Inf must not reach a row (0 * NaN in the dots)
            k, v = _finite(k), _finite(v)
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

    lo, hi, flo, fhi = key_blocks(q0, bq, bk, nk, st)
    if st.segments:
        lo, hi = jnp.maximum(lo, lo_ref[i]), jnp.minimum(hi, hi_ref[i])
    dq = loops(
        lo, hi, flo, fhi, step, jnp.zeros(q.shape, jnp.float32), st, head=st.left is not None
    )
    # a dead row (lse2 = +inf) may have met a bad key in an unmasked tile: it passes nothing
    dq = jnp.where((lse == jnp.inf)[:, None], 0.0, dq)
    plgpu.store(dq_ref, (dq * st.scale).astype(dq_ref.dtype))


def dq(q, k, v, do, lse2, delta, qseg, kseg, st):
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
        lo, hi = segment_ranges(qseg, kseg, bq, bk)
        in_specs += [
            pl.BlockSpec((None, bq), lambda i, b, h: (b, qi(i))),
            pl.BlockSpec((None, S), lambda i, b, h: (b, 0)),
            pl.BlockSpec((None, nq), lambda i, b, h: (b, 0)),
            pl.BlockSpec((None, nq), lambda i, b, h: (b, 0)),
        ]
        args += [qseg, kseg, lo, hi]
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
