"""The static description of one convolution call (Pallas Triton) and the tile loads and
grid its forward and backward kernels share.

One program per (batch row, ``block_c`` channels, ``block_t`` steps). Its input is the tile
of rows ``[t0 - (W - 1), t0 + block_t)``: the ``block_t`` rows it owns and the W - 1 rows
of halo before them (the initial state's rows where they fall before step 0). A tap's view
of it, rows shifted by ``o``, is a 2D load at an offset: the tile and its halo come from
global memory once and the other taps' overlapping loads are served by the L1 cache, so
global traffic is the tile plus its halo, not W tiles. Rows out of range load 0 (masked
gathers: a row index below 0 or past T is never dereferenced).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu


@dataclasses.dataclass(frozen=True)
class Static:
    T: int
    W: int
    silu: bool
    block_c: int
    block_t: int
    bwd_block_t: int
    num_warps: int
    interpret: bool


class Tile:
    """Row and channel indices of this program's tile and its masked loads."""

    def __init__(self, st: Static, C: int):
        self.st = st
        self.b = pl.program_id(0)
        self.c0 = pl.program_id(1) * st.block_c
        self.t0 = pl.program_id(2) * st.block_t
        self.cols = self.c0 + jnp.arange(st.block_c)
        self.cmask = self.cols < C

    def rows(self, offset: int, n: int | None = None):
        """Row indices ``t0 + offset + [0, n)`` as ``[n, 1]``."""
        return self.t0 + offset + jnp.arange(n or self.st.block_t)[:, None]

    def load_x(self, x_ref, h_ref, r):
        """xp at rows ``r [n, 1]`` as float32 ``[n, block_c]``: x for 0 <= r < T, the
        initial state's row ``r + W - 1`` for -(W - 1) <= r < 0 (zeros without one), zeros
        elsewhere."""
        c = self.cols[None, :]
        ok = self.cmask[None, :] & (r >= 0) & (r < self.st.T)
        v = plgpu.load(x_ref.at[self.b, r, c], mask=ok, other=0.0).astype(jnp.float32)
        if h_ref is not None:
            ok_h = self.cmask[None, :] & (r < 0) & (r >= 1 - self.st.W)
            hv = plgpu.load(h_ref.at[self.b, r + self.st.W - 1, c], mask=ok_h, other=0.0)
            v = v + hv.astype(jnp.float32)
        return v

    def load_rows(self, ref, r):
        """A ``[B, T, C]`` operand at rows ``r`` (zeros outside ``[0, T)``)."""
        c = self.cols[None, :]
        ok = self.cmask[None, :] & (r >= 0) & (r < self.st.T)
        return plgpu.load(ref.at[self.b, r, c], mask=ok, other=0.0).astype(jnp.float32)

    def store_rows(self, ref, r, value, lo: int = 0, hi: int | None = None):
        """Stores ``value`` at rows ``r`` of ``ref`` where ``lo <= r < hi`` (default T)."""
        hi = self.st.T if hi is None else hi
        ok = self.cmask[None, :] & (r >= lo) & (r < hi)
        plgpu.store(ref.at[self.b, r, self.cols[None, :]], value.astype(ref.dtype), mask=ok)

    def weights(self, w_ref, bias_ref):
        """The W taps ``[1, block_c]`` float32 and the bias (None without)."""
        W = self.st.W
        w = [
            plgpu.load(w_ref.at[j, self.cols], mask=self.cmask, other=0.0).astype(jnp.float32)[
                None, :
            ]
            for j in range(W)
        ]
        bias = None
        if bias_ref is not None:
            bias = plgpu.load(bias_ref.at[self.cols], mask=self.cmask, other=0.0)
            bias = bias.astype(jnp.float32)[None, :]
        return w, bias


def pre_activation(w, bias, taps):
    """``sum_j w[j] taps[j] (+ bias)``."""
    pre = w[0] * taps[0]
    for j in range(1, len(w)):
        pre = pre + w[j] * taps[j]
    return pre if bias is None else pre + bias


def grid(st, B, C):
    return (B, pl.cdiv(C, st.block_c), pl.cdiv(st.T, st.block_t))


def call_params(st):
    return dict(
        interpret=st.interpret,
        compiler_params=plgpu.CompilerParams(num_warps=st.num_warps, num_stages=1),
    )
