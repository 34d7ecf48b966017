"""The static description of one convolution call (Pallas Mosaic TPU), its tile layout and
the block specs, history fill and tap sums its forward and backward kernels share."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax.experimental import pallas as pl

from seqmix.kernels import common

LANES = 128
HALO = 16  # rows of the halo block: >= W - 1 and a whole bf16 sublane tile
MAX_WIDTH = HALO // 2


@dataclasses.dataclass(frozen=True)
class Static:
    W: int
    silu: bool
    block_t: int
    block_c: int
    interpret: bool


def preactivation(xe_ref, w_ref, bias_ref, W, start, rows):
    """bias + sum_j w[j] * xe[start + j : start + j + rows] (float32 ``[rows, block_c]``)."""
    acc = None
    for j in range(W):
        term = w_ref[pl.ds(j, 1), :].astype(jnp.float32) * xe_ref[pl.ds(start + j, rows), :]
        acc = term if acc is None else acc + term
    if bias_ref is not None:
        acc = acc + bias_ref[...].astype(jnp.float32)
    return acc


def fill_history(xe_ref, halo_ref, h_ref, i):
    """Rows [0, HALO) of the scratch: the HALO inputs before this tile."""

    @pl.when(i == 0)
    def _():
        if h_ref is not None:
            xe_ref[pl.ds(0, HALO), :] = h_ref[...].astype(jnp.float32)
        else:
            xe_ref[pl.ds(0, HALO), :] = jnp.zeros((HALO, xe_ref.shape[1]), jnp.float32)

    @pl.when(i > 0)
    def _():
        xe_ref[pl.ds(0, HALO), :] = halo_ref[...].astype(jnp.float32)


def specs(st: Static, nT: int):
    Tc, bc = st.block_t, st.block_c
    r = Tc // HALO
    tile = pl.BlockSpec((None, Tc, bc), lambda b, c, i: (b, i, c))
    before = pl.BlockSpec((None, HALO, bc), lambda b, c, i: (b, jnp.maximum(i * r - 1, 0), c))
    after = pl.BlockSpec(
        (None, HALO, bc), lambda b, c, i: (b, jnp.minimum((i + 1) * r, nT * r - 1), c)
    )
    w = pl.BlockSpec((st.W, bc), lambda b, c, i: (0, c))
    row = pl.BlockSpec((1, bc), lambda b, c, i: (0, c))
    hist = pl.BlockSpec((None, HALO, bc), lambda b, c, i: (b, 0, c))
    part = pl.BlockSpec((None, None, st.W, bc), lambda b, c, i: (b, i, 0, c))
    part_row = pl.BlockSpec((None, None, 1, bc), lambda b, c, i: (b, i, 0, c))
    dh = pl.BlockSpec((None, st.W - 1, bc), lambda b, c, i: (b, 0, c))
    return dict(
        tile=tile,
        before=before,
        after=after,
        w=w,
        row=row,
        hist=hist,
        part=part,
        part_row=part_row,
        dh=dh,
    )


def interpret_params(st):
    return common.interpret_params("pallas_tpu", st.interpret)
