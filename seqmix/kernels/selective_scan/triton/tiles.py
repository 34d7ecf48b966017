"""The tiles of the chunked Triton selective-scan kernels and the pallas_call plumbing their
forward and backward share.

One program per (batch row, ``block_d`` channels of one group); it walks time in chunks of
``chunk`` steps. A chunk's pairs ``(a, b) = (exp(dt A), dt u B)`` form ``[N, chunk,
block_d]`` float32 tiles (state, time, channel): the time axis is the scanned one, the
channel axis the contiguous one of u / delta / z / y, and B / C arrive transposed
(``[B, G, N, T]``) so a chunk of them is one ``[N, chunk]`` load, contiguous in time.
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

from seqmix.kernels.common import softplus

LOG2E = math.log2(math.e)


@dataclasses.dataclass(frozen=True)
class Static:
    T: int  # true length; steps at or past it are padding
    padded: bool  # T < the padded length
    chunk: int  # K: time steps scanned at once
    block_d: int  # channels per program
    group_blocks: int  # channel blocks per group
    softplus: bool
    num_warps: int
    bwd_num_warps: int
    num_stages: int
    interpret: bool


def pow2_divisor(n: int, cap: int) -> int:
    """The largest power of 2 that divides n and is <= cap."""
    b = 1
    while b * 2 <= cap and n % (b * 2) == 0:
        b *= 2
    return b


class Refs:
    """Named access to the kernel's refs; absent (or not passed) operands are None."""

    def __init__(self, refs, names):
        it = iter(refs)
        for name, present in names:
            setattr(self, name, next(it) if present else None)

    def __getattr__(self, name):  # only called for names not set above
        return None


def named_call(kernel, name, ins, outs, spec, grid, st, num_warps):
    """One ``pallas_call`` on named operands, ``None`` where absent: ``ins`` (name, array or
    None, spec kind), ``outs`` (name, shape or None, spec kind), ``spec`` the BlockSpec of
    each kind. The kernel gets ``names`` (each name with whether it is present) to unpack
    its refs; returns the outputs by name (None where absent)."""
    names = tuple((n, x is not None) for n, x, _ in ins) + tuple(
        (n, s is not None) for n, s, _ in outs
    )
    got = pl.pallas_call(
        functools.partial(kernel, st=st, names=names),
        grid=grid,
        in_specs=[spec[k] for _, x, k in ins if x is not None],
        out_specs=[spec[k] for _, s, k in outs if s is not None],
        out_shape=[s for _, s, _ in outs if s is not None],
        interpret=st.interpret,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=st.num_stages),
        name=name,
    )(*[x for _, x, _ in ins if x is not None])
    it = iter(got)
    return {n: (next(it) if s is not None else None) for n, s, _ in outs}


class Call:
    """Block specs and the pallas_call plumbing shared by the kernels; grid (B, Dm /
    block_d). Every time-indexed operand is one block over all of (padded) time; the kernels
    slice chunks out of it. A and the states are transposed: ``[N, block_d]`` blocks of
    ``A^T [N, Dm]`` and of states ``[B, N, Dm]``."""

    def __init__(self, st: Static, Bsz: int, Tp: int, Dm: int, N: int):
        self.st, self.Bsz, self.Tp, self.Dm, self.N = st, Bsz, Tp, Dm, N
        self.nJ = Dm // st.block_d
        bd, gb, nk = st.block_d, st.group_blocks, Tp // st.chunk
        self.spec = dict(
            seq=pl.BlockSpec((None, Tp, bd), lambda b, j: (b, 0, j)),
            grp=pl.BlockSpec((None, None, N, Tp), lambda b, j: (b, j // gb, 0, 0)),
            mat=pl.BlockSpec((N, bd), lambda b, j: (0, j)),
            vec=pl.BlockSpec((bd,), lambda b, j: (j,)),
            state=pl.BlockSpec((None, N, bd), lambda b, j: (b, 0, j)),
            row_vec=pl.BlockSpec((None, bd), lambda b, j: (b, j)),
            ckpt=pl.BlockSpec((None, nk, N, bd), lambda b, j: (b, 0, 0, j)),
            part=pl.BlockSpec((None, None, N, Tp), lambda b, j: (b, j, 0, 0)),
        )

    def shape(self, kind, dtype=jnp.float32):
        B, Dm, N = self.Bsz, self.Dm, self.N
        return jax.ShapeDtypeStruct(
            {
                "state": (B, N, Dm),
                "row_vec": (B, Dm),
                "ckpt": (B, self.Tp // self.st.chunk, N, Dm),
                "part": (B, self.nJ, N, self.Tp),
                "seq": (B, self.Tp, Dm),
            }[kind],
            dtype,
        )

    def __call__(self, kernel, name, ins, outs, num_warps):
        """``ins``: (name, array or None, spec kind); ``outs``: (name, shape or None, kind)."""
        grid = (self.Bsz, self.nJ)
        return named_call(kernel, name, ins, outs, self.spec, grid, self.st, num_warps)


class Chunk:
    """What a program reads once (A^T, A^T log2 e, delta_bias, D) and the loads and maps of
    one chunk starting at step ``base``."""

    def __init__(self, r: Refs, st: Static):
        self.r, self.st = r, st
        self.A = r.A[...].astype(jnp.float32)  # [N, bd]
        self.A2 = self.A * LOG2E
        self.bias = r.bias[...].astype(jnp.float32) if r.bias is not None else None
        self.D = r.D[...].astype(jnp.float32) if r.D is not None else None
        self.n_chunks = r.u.shape[0] // st.chunk

    def start(self, k):
        return pl.multiple_of(k * self.st.chunk, self.st.chunk)

    def rows(self, ref, base):
        """``[chunk, bd]`` float32 of a time-major operand."""
        return ref[pl.ds(base, self.st.chunk), :].astype(jnp.float32)

    def cols(self, ref, base):
        """``[N, chunk]`` float32 of B or C (time-minor)."""
        return ref[:, pl.ds(base, self.st.chunk)].astype(jnp.float32)

    def dt(self, base):
        """(x, dt) ``[chunk, bd]``: x = delta + bias, dt = softplus(x) (or x), 0 on padding."""
        x = self.rows(self.r.delta, base)
        if self.bias is not None:
            x = x + self.bias[None, :]
        dt = softplus(x) if self.st.softplus else x
        if self.st.padded:
            t = base + lax.broadcasted_iota(jnp.int32, dt.shape, 0)
            dt = jnp.where(t < self.st.T, dt, 0.0)
        return x, dt

    def pairs(self, dt, u, Bk):
        """``a = exp(dt A)`` and ``b = dt u B`` as ``[N, chunk, bd]``."""
        a = jnp.exp2(dt[None, :, :] * self.A2[:, None, :])
        b = (dt * u)[None, :, :] * Bk[:, :, None]
        return a, b


def time_index(x):
    return lax.broadcasted_iota(jnp.int32, x.shape, 1)


def at_step(x, i):
    """``x[:, i]`` of a ``[N, chunk, bd]`` tile as ``[N, bd]`` (a masked sum over time: no
    slicing of the scanned axis)."""
    return jnp.sum(jnp.where(time_index(x) == i, x, 0.0), axis=1)
