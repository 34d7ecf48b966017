"""The forward kernel of the causal convolution in Pallas Triton: one program per (batch
row, ``block_c`` channels, ``block_t`` steps) loads its input tile with the W - 1 row halo
(``tiles.py``: one shifted view per tap), computes
``y[t] = act(sum_j weight[j] xp[t + j] + bias)`` for the whole tile (float32) and stores it
once."""

from __future__ import annotations

import jax
from jax.experimental import pallas as pl

from seqmix.kernels.conv1d.triton.tiles import Static, Tile, call_params, grid, pre_activation


def _fwd_kernel(x_ref, w_ref, bias_ref, h_ref, y_ref, *, st: Static):
    tile = Tile(st, x_ref.shape[2])
    w, bias = tile.weights(w_ref, bias_ref)
    W = st.W
    taps = [tile.load_x(x_ref, h_ref, tile.rows(j - (W - 1))) for j in range(W)]
    pre = pre_activation(w, bias, taps)
    y = pre * jax.nn.sigmoid(pre) if st.silu else pre
    tile.store_rows(y_ref, tile.rows(0), y)


def forward(st, x, weight, bias, h0):
    B, _T, C = x.shape
    args = [x, weight] + [a for a in (bias, h0) if a is not None]

    def kernel(*refs):
        it = iter(refs)
        x_ref, w_ref = next(it), next(it)
        b_ref = next(it) if bias is not None else None
        h_ref = next(it) if h0 is not None else None
        _fwd_kernel(x_ref, w_ref, b_ref, h_ref, next(it), st=st)

    return pl.pallas_call(
        kernel,
        grid=grid(st, B, C),
        out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
        name="causal_conv1d_fwd",
        **call_params(st),
    )(*args)
