"""The tiles of the chunked TPU selective-scan kernels: time on sublanes, channels on lanes,
the in-register scan, and the pallas_call plumbing their forward and backward share.

A program owns ``block_c`` channels (a multiple of 128, inside one group; each group's
channels are padded to a multiple of ``block_c``) of one batch row and walks time over the
last grid axis (``"arbitrary"``) in chunks of ``chunk`` steps. A chunk of u / delta / z is a
``[chunk, block_c]`` tile (time on sublanes); per state n the pairs ``(a, b) = (exp(dt
A_n), dt u B_{t,n})`` are ``[chunk, block_c]`` float32 tiles, scanned along sublanes in
``log2(chunk)`` steps (Hillis-Steele: combine each row with the row ``2^i`` above,
brought there by a sublane rotation). The carried state lives in VMEM scratch between grid
steps.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from seqmix.kernels import common
from seqmix.kernels.common import softplus


@dataclasses.dataclass(frozen=True)
class Static:
    T: int
    softplus: bool
    chunk: int  # time steps per grid step (sublanes)
    block_c: int  # channels per program (lanes)
    group_blocks: int  # programs per group
    interpret: bool


class Refs:
    def __init__(self, refs, names):
        it = iter(refs)
        for name, present in names:
            setattr(self, name, next(it) if present else None)


def affine_scan(a, b, *, reverse: bool = False):
    """The inclusive scan along sublanes of the affine maps ``x -> a x + b`` (forward: row t
    holds the composition of rows 0..t; reverse: of rows t..end, the later ones first), as
    ``(prod a, b composed)``; ``[chunk, lanes]`` float32 each."""
    K = a.shape[0]
    row = lax.broadcasted_iota(jnp.int32, a.shape, 0)
    k = 1
    while k < K:
        # forward: row t combines with row t - k (earlier); reverse: with row t + k
        shift = K - k if reverse else k
        a_o, b_o = pltpu.roll(a, shift, 0), pltpu.roll(b, shift, 0)
        valid = row < K - k if reverse else row >= k
        a, b = jnp.where(valid, a * a_o, a), jnp.where(valid, a * b_o + b, b)
        k *= 2
    return a, b


def shift_rows(x, first, *, reverse: bool = False):
    """``x`` moved one row down (row 0 = ``first``), or up for ``reverse`` (last row =
    ``first``): the exclusive values of an inclusive scan."""
    K = x.shape[0]
    row = lax.broadcasted_iota(jnp.int32, x.shape, 0)
    if reverse:
        return jnp.where(row == K - 1, first, pltpu.roll(x, K - 1, 0))
    return jnp.where(row == 0, first, pltpu.roll(x, 1, 0))


def column(x, n):
    """Column n of a ``[chunk, N]`` tile as ``[chunk, 1]``."""
    return x[:, n : n + 1]


def into_column(acc, col, n):
    """``acc [chunk, N]`` with column n set to ``col [chunk, 1]``."""
    lane = lax.broadcasted_iota(jnp.int32, acc.shape, 1)
    return jnp.where(lane == n, col, acc)


def chunk_dt(r, st: Static, bias, c):
    """(x, dt) ``[chunk, block_c]`` of grid step c: dt is 0 on padded steps."""
    x = r.delta[...].astype(jnp.float32)
    if bias is not None:
        x = x + bias
    dt = softplus(x) if st.softplus else x
    if st.T % st.chunk:
        t = c * st.chunk + lax.broadcasted_iota(jnp.int32, dt.shape, 0)
        dt = jnp.where(t < st.T, dt, 0.0)
    return x, dt


def specs(st: Static, N: int, reverse: bool):
    """Block specs on grid (B, channel blocks, chunks); ``reverse`` walks the chunks from the
    end."""
    K, L, gb = st.chunk, st.block_c, st.group_blocks

    def cix(c):
        return (pl.num_programs(2) - 1 - c) if reverse else c

    return dict(
        seq=pl.BlockSpec((None, K, L), lambda b, j, c: (b, cix(c), j)),
        rows=pl.BlockSpec((None, K, None, N), lambda b, j, c: (b, cix(c), j // gb, 0)),
        mat=pl.BlockSpec((N, L), lambda b, j, c: (0, j)),
        vec=pl.BlockSpec((1, L), lambda b, j, c: (0, j)),
        state=pl.BlockSpec((None, N, L), lambda b, j, c: (b, 0, j)),
        row_vec=pl.BlockSpec((None, 1, L), lambda b, j, c: (b, 0, j)),
        ckpt=pl.BlockSpec((None, None, N, L), lambda b, j, c: (b, cix(c), 0, j)),
        part=pl.BlockSpec((None, None, K, N), lambda b, j, c: (b, j, cix(c), 0)),
    )


def call(kernel, name, st: Static, grid, ins, outs, scratch):
    """``pallas_call`` of ``kernel(*refs, st=, names=)``; ``ins``: (name, array or None,
    spec), ``outs``: (name, shape or None, spec). Returns name -> output (None if absent)."""
    names = tuple((n, x is not None) for n, x, _ in ins) + tuple(
        (n, s is not None) for n, s, _ in outs
    )
    got = pl.pallas_call(
        lambda *refs: kernel(*refs, st=st, names=names),
        grid=grid,
        in_specs=[s for _, x, s in ins if x is not None],
        out_specs=[s for _, o, s in outs if o is not None],
        out_shape=[o for _, o, _ in outs if o is not None],
        scratch_shapes=scratch,
        interpret=common.interpret_params("pallas_tpu", st.interpret),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary"),
            vmem_limit_bytes=48 * 1024 * 1024,
        ),
        name=name,
    )(*[x for _, x, _ in ins if x is not None])
    it = iter(got)
    return {n: (next(it) if o is not None else None) for n, o, _ in outs}
