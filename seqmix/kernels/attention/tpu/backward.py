"""The flash-attention backward kernels (Pallas Mosaic TPU): dQ and dK/dV.

dQ: grid ``(B, H, T/bq, nkv)``, shaped like the forward. dK/dV: grid
``(B, Hkv, S/bk, G, nq)`` (parallel x3, arbitrary x2): the G query heads of a KV head and
their query blocks are reduction axes that accumulate into one resident f32 dK/dV block, so
GQA never repeats K/V in memory and dK/dV are summed inside the kernel. Both read the lse
and ``delta`` rows lane-dense, ``[B, H, 1, T]``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from seqmix.kernels.attention.tpu.blocks import (
    LANES,
    NN,
    NT,
    SUBLANES,
    Cfg,
    cap,
    compiler_params,
    interpret_params,
    kv_block,
    kv_steps,
    needs_mask,
    q_block,
    q_steps,
    visible,
    when_masked,
)


def finite(x):
    """``x`` with its non-finite entries zeroed: a NaN or Inf at a masked position (and the
    entries of rows that pass no gradient) must not meet a zero weight in a matmul."""
    return jnp.where(jnp.abs(x.astype(jnp.float32)) < jnp.inf, x, jnp.zeros_like(x))


def _dq_kernel(*refs, c: Cfg, nkv: int):
    if c.has_seg:
        q_ref, k_ref, v_ref, sq_ref, sk_ref, do_ref, lse_ref, dc_ref, dq_ref, acc = refs
    else:
        q_ref, k_ref, v_ref, do_ref, lse_ref, dc_ref, dq_ref, acc = refs
    i, jj = pl.program_id(2), pl.program_id(3)
    j, run = kv_block(i, jj, c)

    @pl.when(jj == 0)
    def _init():
        acc[...] = jnp.zeros(acc.shape, jnp.float32)

    def step(masked: bool):
        q, k, v, do = finite(q_ref[...]), finite(k_ref[...]), finite(v_ref[...]), do_ref[...]
        s_raw = (
            lax.dot_general(q, k, NT, precision=c.precision, preferred_element_type=jnp.float32)
            * c.scale
        )
        s = cap(s_raw, c)
        if masked:
            seg = {}
            if c.has_seg:
                seg = dict(q_seg=jnp.tile(sq_ref[...], (1, c.bk // LANES)), k_seg=sk_ref[0:1, :])
            mask = visible(i * c.bq, j * c.bk, s.shape, c, keys_on_rows=False, **seg)
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

    when_masked(run, needs_mask(i, j, c), step)

    @pl.when(jj == nkv - 1)
    def _finish():
        dq_ref[...] = acc[...].astype(dq_ref.dtype)


def _dkv_kernel(*refs, c: Cfg, nq_steps: int):
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
    i, run = q_block(j, ii, c)

    @pl.when(jnp.logical_and(g == 0, ii == 0))
    def _init():
        dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
        dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)

    def step(masked: bool):
        # transposed tile: rows are keys, columns queries, so the per-query lse and dc rows
        # broadcast along sublanes and dV/dK are plain (NN) matmuls
        q, k, v, do = finite(q_ref[...]), finite(k_ref[...]), finite(v_ref[...]), do_ref[...]
        st_raw = (
            lax.dot_general(k, q, NT, precision=c.precision, preferred_element_type=jnp.float32)
            * c.scale
        )
        st = cap(st_raw, c)
        if masked:
            seg = {}
            if c.has_seg:
                seg = dict(q_seg=sq_ref[0:1, :], k_seg=jnp.tile(sk_ref[...], (1, c.bq // LANES)))
            mask = visible(i * c.bq, j * c.bk, st.shape, c, keys_on_rows=True, **seg)
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

    when_masked(run, needs_mask(i, j, c), step)

    @pl.when(jnp.logical_and(g == c.G - 1, ii == nq_steps - 1))
    def _finish():
        dk_ref[...] = dk_acc[...].astype(dk_ref.dtype)
        dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


def backward(qk, kk, vk, seg, dok, lse_b, dc, c: Cfg):
    """Kernel-layout backward -> dq [B,Tp,H*Dp], dk, dv [B,Sp,Hkv*Dp]."""
    G = c.G
    dt = jnp.dtype(c.compute_dtype)
    itemsize = dt.itemsize
    sem3 = ("parallel", "parallel", "parallel", "arbitrary")

    # dQ: same iteration space as the forward
    nkv = kv_steps(c)

    def q_map(b, h, i, jj):
        return b, i, h

    def kv_map(b, h, i, jj):
        return b, kv_block(i, jj, c)[0], h // G

    row_map = lambda b, h, i, jj: (b, h, 0, i)
    in_specs = [
        pl.BlockSpec((None, c.bq, c.Dp), q_map),
        pl.BlockSpec((None, c.bk, c.Dp), kv_map),
        pl.BlockSpec((None, c.bk, c.Dp), kv_map),
    ]
    args = [qk, kk, vk]
    if c.has_seg:
        col, row = seg[:2]  # the queries' ids as columns, the keys' as rows
        in_specs += [
            pl.BlockSpec((None, c.bq, LANES), lambda b, h, i, jj: (b, i, 0)),
            pl.BlockSpec((None, SUBLANES, c.bk), lambda b, h, i, jj: (b, 0, kv_block(i, jj, c)[0])),
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
        compiler_params=compiler_params(sem3),
        cost_estimate=pl.CostEstimate(
            flops=int(flops),
            transcendentals=int(flops / (6 * c.Dp)),
            bytes_accessed=int(itemsize * c.B * c.H * c.Dp * (3 * c.Tp + 2 * c.nq * nkv * c.bk)),
        ),
        interpret=interpret_params(c),
        name="seqmix_flash_bwd_dq",
    )(*args)

    # dK/dV: per KV head, the group's q heads and the visible q blocks are reduction axes
    nqs = q_steps(c)

    def qh_map(b, hk, j, g, ii):
        return b, q_block(j, ii, c)[0], hk * G + g

    def k_map(b, hk, j, g, ii):
        return b, j, hk

    def row_map2(b, hk, j, g, ii):
        return b, hk * G + g, 0, q_block(j, ii, c)[0]

    in_specs = [
        pl.BlockSpec((None, c.bq, c.Dp), qh_map),
        pl.BlockSpec((None, c.bk, c.Dp), k_map),
        pl.BlockSpec((None, c.bk, c.Dp), k_map),
    ]
    args = [qk, kk, vk]
    if c.has_seg:
        row, col = seg[2:]  # the queries' ids as rows, the keys' as columns
        in_specs += [
            pl.BlockSpec(
                (None, SUBLANES, c.bq), lambda b, hk, j, g, ii: (b, 0, q_block(j, ii, c)[0])
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
        compiler_params=compiler_params(
            ("parallel", "parallel", "parallel", "arbitrary", "arbitrary")
        ),
        cost_estimate=pl.CostEstimate(
            flops=int(flops),
            transcendentals=int(flops / (8 * c.Dp)),
            bytes_accessed=int(
                itemsize * c.B * c.Dp * (4 * c.Hkv * c.Sp + 2 * c.H * c.nk * nqs * c.bq)
            ),
        ),
        interpret=interpret_params(c),
        name="seqmix_flash_bwd_dkv",
    )(*args)
    return dq, dk, dv
