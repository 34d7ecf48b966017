"""The backward kernel of the causal convolution on a TPU: ``dpre = dy * act'(pre)`` over
the tile plus ``halo`` rows after it, ``dx[s] = sum_j weight[j] dpre[s + W - 1 - j]``,
per-tile partial sums of dweight and dbias (reduced in XLA), and d initial_state from the
first tile."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from seqmix.kernels.conv1d.tpu.tiles import (
    HALO,
    Static,
    fill_history,
    interpret_params,
    preactivation,
    specs,
)


def _silu_grad(pre):
    s = jax.nn.sigmoid(pre)
    return s * (1.0 + pre * (1.0 - s))


def _bwd_kernel(
    x_ref,
    halo_ref,
    after_ref,
    w_ref,
    bias_ref,
    h_ref,
    dy_ref,
    dy_after_ref,
    dx_ref,
    dw_ref,
    db_ref,
    dh_ref,
    xe_ref,
    de_ref,
    *,
    st: Static,
):
    Tc, W = st.block_t, st.W
    i = pl.program_id(2)
    last = i == pl.num_programs(2) - 1
    fill_history(xe_ref, halo_ref, h_ref, i)
    xe_ref[pl.ds(HALO, Tc), :] = x_ref[...].astype(jnp.float32)
    after = after_ref[...].astype(jnp.float32)
    xe_ref[pl.ds(HALO + Tc, HALO), :] = jnp.where(last, 0.0, after)
    # dpre over the tile and the HALO rows after it (zero past the end).
    dy_after = jnp.where(last, 0.0, dy_after_ref[...].astype(jnp.float32))
    de_ref[pl.ds(0, Tc), :] = dy_ref[...].astype(jnp.float32)
    de_ref[pl.ds(Tc, HALO), :] = dy_after
    if st.silu:
        pre = preactivation(xe_ref, w_ref, bias_ref, W, HALO - (W - 1), Tc + HALO)
        de_ref[...] = de_ref[...] * _silu_grad(pre)
    dx = None
    for j in range(W):
        term = w_ref[pl.ds(j, 1), :].astype(jnp.float32) * de_ref[pl.ds(W - 1 - j, Tc), :]
        dx = term if dx is None else dx + term
    dx_ref[...] = dx.astype(dx_ref.dtype)
    de = de_ref[pl.ds(0, Tc), :]
    for j in range(W):
        xs = xe_ref[pl.ds(HALO - (W - 1) + j, Tc), :]
        dw_ref[pl.ds(j, 1), :] = jnp.sum(de * xs, axis=0, keepdims=True)
    if db_ref is not None:
        db_ref[...] = jnp.sum(de, axis=0, keepdims=True)
    if dh_ref is not None:

        @pl.when(i == 0)
        def _():
            for k in range(W - 1):  # d xp[k] = sum_{j <= k} w[j] dpre[k - j]
                acc = None
                for j in range(k + 1):
                    term = w_ref[pl.ds(j, 1), :].astype(jnp.float32) * de_ref[pl.ds(k - j, 1), :]
                    acc = term if acc is None else acc + term
                dh_ref[pl.ds(k, 1), :] = acc.astype(dh_ref.dtype)


def backward(st, x, weight, bias, hist, dy):
    B, Tp, Cp = x.shape
    W = st.W
    nT = Tp // st.block_t
    sp = specs(st, nT)
    f32 = jnp.float32
    args = [
        (x, sp["tile"]),
        (x, sp["before"]),
        (x, sp["after"]),
        (weight, sp["w"]),
        (bias, sp["row"]),
        (hist, sp["hist"]),
        (dy, sp["tile"]),
        (dy, sp["after"]),
    ]
    outs = [
        (jax.ShapeDtypeStruct(x.shape, x.dtype), sp["tile"]),
        (jax.ShapeDtypeStruct((B, nT, W, Cp), f32), sp["part"]),
        (jax.ShapeDtypeStruct((B, nT, 1, Cp), f32) if bias is not None else None, sp["part_row"]),
        (jax.ShapeDtypeStruct((B, W - 1, Cp), f32) if hist is not None else None, sp["dh"]),
    ]
    present = [a is not None for a, _ in args] + [o is not None for o, _ in outs]

    def kernel(*refs):
        it = iter(refs)
        refs = [next(it) if p else None for p in present]
        _bwd_kernel(*refs, *it, st=st)

    got = iter(
        pl.pallas_call(
            kernel,
            grid=(B, Cp // st.block_c, nT),
            in_specs=[s for a, s in args if a is not None],
            out_specs=[s for o, s in outs if o is not None],
            out_shape=[o for o, _ in outs if o is not None],
            scratch_shapes=[
                pltpu.VMEM((2 * HALO + st.block_t, st.block_c), f32),
                pltpu.VMEM((HALO + st.block_t, st.block_c), f32),
            ],
            interpret=interpret_params(st),
            # d initial_state is written by the first time tile and kept resident: time is
            # sequential.
            compiler_params=pltpu.CompilerParams(
                dimension_semantics=("parallel", "parallel", "arbitrary")
            ),
            name="causal_conv1d_bwd",
        )(*[a for a, _ in args if a is not None])
    )
    dx, dw = next(got), next(got)
    db = next(got).sum((0, 1)).astype(bias.dtype) if bias is not None else None
    dh = None
    if hist is not None:  # back to the zero-padded HALO-row history layout
        dh = next(got)
        dh = jnp.pad(dh, [(0, 0), (HALO - (W - 1), 0), (0, 0)]).astype(hist.dtype)
    return dx, dw.sum((0, 1)).astype(weight.dtype), db, dh
