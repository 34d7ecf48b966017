"""The backward kernel of the causal convolution in Pallas Triton: one program per (batch
row, ``block_c`` channels, ``block_t`` steps), on its tile with halos on both sides.

``dpre[t] = dy[t] * act'(pre[t])`` (0 outside ``[0, T)``), ``dx[s] = sum_j weight[j]
dpre[s + W - 1 - j]``: the tile's dx needs dpre at its rows and the W - 1 after them, so
``pre`` is recomputed at those W shifted views from the 2W - 1 shifted views of xp
(``tiles.py``; the forward's halo before the tile and W - 1 rows after it). The program of
the first time block also emits d initial_state (dx of the rows before step 0). dweight
and dbias are per-program partial sums over the tile's rows that XLA reduces."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from seqmix.kernels.conv1d.triton.tiles import Static, Tile, call_params, grid, pre_activation


def _dpre(tile, st, w, bias, x_view, dy_ref, offset, n):
    """dpre at rows ``t0 + offset + [0, n)``; ``x_view(o)`` is xp at those rows + o."""
    dpre = tile.load_rows(dy_ref, tile.rows(offset, n))
    if st.silu:
        W = st.W
        pre = pre_activation(w, bias, [x_view(offset + j - (W - 1)) for j in range(W)])
        sg = jax.nn.sigmoid(pre)
        dpre = dpre * sg * (1.0 + pre * (1.0 - sg))
    return dpre


def _bwd_kernel(
    x_ref, w_ref, bias_ref, h_ref, dy_ref, dx_ref, dw_ref, db_ref, dh_ref, *, st: Static
):
    tile = Tile(st, x_ref.shape[2])
    w, bias = tile.weights(w_ref, bias_ref)
    W, bt = st.W, st.block_t
    views = {}

    def x_view(o, n=bt):  # xp at rows t0 + o + [0, n), each view loaded once
        if (o, n) not in views:
            views[(o, n)] = tile.load_x(x_ref, h_ref, tile.rows(o, n))
        return views[(o, n)]

    dpre = [_dpre(tile, st, w, bias, x_view, dy_ref, k, bt) for k in range(W)]
    dx = w[W - 1] * dpre[0]
    for j in range(W - 1):
        dx = dx + w[j] * dpre[W - 1 - j]
    tile.store_rows(dx_ref, tile.rows(0), dx)
    # dweight[j] = sum_t dpre[t] xp[t + j], dbias = sum_t dpre[t], over the owned rows
    pid_t = pl.program_id(2)
    for j in range(W):
        dw_ref[tile.b, pid_t, j, pl.ds(tile.c0, st.block_c)] = jnp.sum(
            dpre[0] * x_view(j - (W - 1)), axis=0
        )
    if db_ref is not None:
        db_ref[tile.b, pid_t, pl.ds(tile.c0, st.block_c)] = jnp.sum(dpre[0], axis=0)
    if dh_ref is not None:
        # dx of rows -(W - 1) .. -1 (the initial state's), from dpre at rows -(W-1) .. W-2
        n = pl.next_power_of_2(W - 1)
        halo = [
            _dpre(tile, st, w, bias, lambda o: x_view(o, n), dy_ref, k - n, n) for k in range(W)
        ]
        dh = w[W - 1] * halo[0]
        for j in range(W - 1):
            dh = dh + w[j] * halo[W - 1 - j]
        r = tile.rows(-n, n)
        # only the first time block writes
        ok = tile.cmask[None, :] & (r >= 1 - W) & (r < 0) & (pid_t == 0)
        plgpu.store(
            dh_ref.at[tile.b, r + W - 1, tile.cols[None, :]], dh.astype(dh_ref.dtype), mask=ok
        )


def backward(st, x, weight, bias, h0, dy):
    B, T, C = x.shape
    W = st.W
    n_t = pl.cdiv(T, st.block_t)
    Cp = pl.cdiv(C, st.block_c) * st.block_c
    f32 = jnp.float32
    args = [x, weight] + [a for a in (bias, h0) if a is not None] + [dy]
    out_shape = [
        jax.ShapeDtypeStruct(x.shape, x.dtype),
        jax.ShapeDtypeStruct((B, n_t, W, Cp), f32),
    ]
    if bias is not None:
        out_shape.append(jax.ShapeDtypeStruct((B, n_t, Cp), f32))
    if h0 is not None:
        out_shape.append(jax.ShapeDtypeStruct(h0.shape, f32))

    def kernel(*refs):
        it = iter(refs)
        x_ref, w_ref = next(it), next(it)
        b_ref = next(it) if bias is not None else None
        h_ref = next(it) if h0 is not None else None
        dy_ref, dx_ref, dw_ref = next(it), next(it), next(it)
        db_ref = next(it) if bias is not None else None
        dh_ref = next(it) if h0 is not None else None
        _bwd_kernel(x_ref, w_ref, b_ref, h_ref, dy_ref, dx_ref, dw_ref, db_ref, dh_ref, st=st)

    outs = iter(
        pl.pallas_call(
            kernel,
            grid=grid(st, B, C),
            out_shape=out_shape,
            name="causal_conv1d_bwd",
            **call_params(st),
        )(*args)
    )
    dx, dw = next(outs), next(outs)
    db = next(outs).sum((0, 1))[:C].astype(bias.dtype) if bias is not None else None
    dh = next(outs).astype(h0.dtype) if h0 is not None else None
    return dx, dw.sum((0, 1))[:, :C].astype(weight.dtype), db, dh
