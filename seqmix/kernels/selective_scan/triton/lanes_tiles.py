"""The tiles and pallas_call plumbing of the one-channel-per-lane selective-scan kernels
(``lanes.py``): their tile sizes, time segments, row-wise state loads and stores, and the
chaining of per-segment results in XLA.

One program per (batch row, ``block_d`` channels of one group, time segment); grid
``(B, Dm / block_d, S)``. Every time-indexed operand is one block over the program's segment
(``seg_len`` steps); B and C stay time-major (``[B, Tp, G, N]``, a step's ``[N]`` row one
load); A and the states are transposed: ``[N, block_d]`` blocks of ``A^T [N, Dm]`` and of
states ``[B, S, N, Dm]``.

Time segments (``Tiles.segments``; by default enough for ``min_programs`` programs) give
parallelism when batch x channel blocks are few: a first pass finds each segment's end
state from a zero start and its total decay ``exp(A sum dt)``, XLA chains them into every
segment's start state (``chain``), and the main pass runs from those; the backward's end
adjoints the same way, in reverse.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from seqmix.kernels.selective_scan.triton.tiles import named_call, pow2_divisor


@dataclasses.dataclass(frozen=True)
class Tiles:
    """Tile sizes of the lanes kernels. ``block_d`` (a power of 2, meant as ``32 x
    num_warps``: one channel per lane) is shrunk to divide the channels per group;
    ``bwd_tile`` must divide ``chunk``; ``segments`` (None: the fewest, at least 4 chunks
    long, that give ``min_programs`` programs) splits time."""

    block_d: int = 32
    chunk: int = 8
    bwd_tile: int = 4
    num_warps: int = 1
    bwd_num_warps: int = 1
    num_stages: int = 1
    segments: int | None = None
    min_programs: int = 264  # two per SM of an H100 / H200


# The GPU tiles (the GPU default of these kernels as measured on an H200 on 2026-11-28): one
# channel per lane, one warp per program; 2.98 ms forward, 11.6 ms forward+backward at
# [8, 4096, 1536, 16]. Chunks of 8 (checkpoints every 8 steps) keep the backward's held
# states to 5 x 16 registers a lane; chunks of 16 gave 1.56 ms forward but 17.1 ms
# forward+backward.
GPU_TILES = Tiles()
# Interpret mode compiles the unrolled bodies on the CPU: short chunks keep tests fast; two
# backward tiles a chunk, and time segments from 8 chunks on (2 of them from T = 32).
INTERPRET_TILES = Tiles(block_d=8, chunk=4, bwd_tile=2)


@dataclasses.dataclass(frozen=True)
class Static:
    T: int  # true length; steps at or past it are padding
    padded: bool  # T < the padded length (a partial or whole padding segment)
    seg_len: int  # L: steps per segment (a multiple of chunk)
    softplus: bool
    block_d: int
    group_blocks: int  # channel blocks per group
    chunk: int
    bwd_tile: int
    num_warps: int
    bwd_num_warps: int
    num_stages: int
    interpret: bool


def _segments(tiles: Tiles, programs: int, n_chunks: int) -> int:
    if tiles.segments is not None:
        return max(1, tiles.segments)
    s = 1
    while programs * s < tiles.min_programs and n_chunks // (2 * s) >= 4:
        s *= 2
    return s


def plan(
    tiles: Tiles,
    *,
    Bsz: int,
    T: int,
    Dm: int,
    G: int,
    softplus: bool,
    interpret: bool,
    multiple: int = 1,
) -> tuple[Static, int]:
    """The ``Static`` of a call and its padded length ``Tp``: ``S`` segments of ``seg_len``
    steps (a multiple of ``tiles.chunk``), ``Tp = S seg_len >= T`` also a multiple of
    ``multiple`` (the chunk of the kernels that share the padded arguments)."""
    if tiles.chunk % tiles.bwd_tile:
        raise ValueError(
            f"the lanes tiles' bwd_tile ({tiles.bwd_tile}) must divide chunk ({tiles.chunk})"
        )
    Dg = Dm // G
    bd = pow2_divisor(Dg, tiles.block_d)
    S = _segments(tiles, Bsz * (Dm // bd), -(-T // tiles.chunk))
    unit = math.lcm(tiles.chunk * S, multiple)
    Tp = -(-T // unit) * unit
    st = Static(
        T=T,
        padded=Tp != T,
        seg_len=Tp // S,
        softplus=bool(softplus),
        block_d=bd,
        group_blocks=Dg // bd,
        chunk=tiles.chunk,
        bwd_tile=tiles.bwd_tile,
        num_warps=tiles.num_warps,
        bwd_num_warps=tiles.bwd_num_warps,
        num_stages=tiles.num_stages,
        interpret=interpret,
    )
    return st, Tp


def row(ref, t):
    return ref[t].astype(jnp.float32)


def get_state(ref, N: int, bd: int, *lead):
    """``[N, bd]`` float32 from N row loads ``ref[*lead, n]``. Every global access of these
    kernels is a row of at most 32 x num_warps elements: Triton then gives it no coalesced
    2D layout of its own that would spread into the loop and displace the default
    one-channel-per-lane layout of the state."""
    n_idx = lax.broadcasted_iota(jnp.int32, (N, bd), 0)
    x = jnp.zeros((N, bd), jnp.float32)
    for n in range(N):
        x = jnp.where(n_idx == n, ref[(*lead, n)].astype(jnp.float32)[None, :], x)
    return x


def set_state(ref, x, *lead):
    """Stores ``x [N, bd]`` as N rows ``ref[*lead, n]`` (row n: a sum over the thread's own
    N values with -0.0 elsewhere, which the compiler folds away)."""
    N, bd = x.shape
    n_idx = lax.broadcasted_iota(jnp.int32, (N, bd), 0)
    for n in range(N):
        ref[(*lead, n)] = jnp.sum(jnp.where(n_idx == n, x, -0.0), axis=0).astype(ref.dtype)


class Call:
    """Block specs and the pallas_call plumbing shared by the lanes kernels; grid
    ``(B, nJ, S)``."""

    def __init__(self, st: Static, Bsz: int, Tp: int, Dm: int, N: int):
        self.st, self.Bsz, self.Tp, self.Dm, self.N = st, Bsz, Tp, Dm, N
        self.nJ = Dm // st.block_d
        self.S = Tp // st.seg_len
        bd, gb, L, nk = st.block_d, st.group_blocks, st.seg_len, st.seg_len // st.chunk
        self.spec = dict(
            seq=pl.BlockSpec((None, L, bd), lambda b, j, s: (b, s, j)),
            grp=pl.BlockSpec((None, L, None, N), lambda b, j, s: (b, s, j // gb, 0)),
            mat=pl.BlockSpec((N, bd), lambda b, j, s: (0, j)),
            vec=pl.BlockSpec((bd,), lambda b, j, s: (j,)),
            seg_state=pl.BlockSpec((None, None, N, bd), lambda b, j, s: (b, s, 0, j)),
            seg_vec=pl.BlockSpec((None, None, bd), lambda b, j, s: (b, s, j)),
            ckpt=pl.BlockSpec((None, nk, N, bd), lambda b, j, s: (b, s, 0, j)),
            part=pl.BlockSpec((None, None, L, N), lambda b, j, s: (b, j, s, 0)),
        )

    def shape(self, kind, dtype=jnp.float32):
        B, S, Dm, N = self.Bsz, self.S, self.Dm, self.N
        return jax.ShapeDtypeStruct(
            {
                "seg_state": (B, S, N, Dm),
                "seg_vec": (B, S, Dm),
                "ckpt": (B, self.Tp // self.st.chunk, N, Dm),
                "part": (B, self.nJ, self.Tp, N),
                "seq": (B, self.Tp, Dm),
            }[kind],
            dtype,
        )

    def __call__(self, kernel, name, ins, outs, num_warps):
        """``ins``: (name, array or None, spec kind); ``outs``: (name, shape or None, kind)."""
        grid = (self.Bsz, self.nJ, self.S)
        return named_call(kernel, name, ins, outs, self.spec, grid, self.st, num_warps)


def chain(decay, local, first, reverse):
    """Chains per-segment results through the segment decays ``exp(A sum dt)``.

    Forward: ``start[0] = first``, ``start[s] = decay[s-1] start[s-1] + local[s-1]``.
    Reverse: ``end[S-1] = first``, ``end[s-1] = decay[s] end[s] + local[s]``.
    ``decay`` and ``local`` are ``[B, S, N, Dm]`` (the kernels' transposed state layout);
    returns the starts (ends).
    """
    xs = (jnp.moveaxis(decay, 1, 0), jnp.moveaxis(local, 1, 0))

    def step(carry, x):
        d, loc = x
        return d * carry + loc, carry

    _, out = lax.scan(step, first, xs, reverse=reverse)
    return jnp.moveaxis(out, 0, 1)


def segment_decay(AT, dtsum):
    """``exp(A sum dt)`` per segment in the transposed layout, ``[B, S, N, Dm]``."""
    return jnp.exp(dtsum[:, :, None, :] * AT.astype(jnp.float32))
