"""Mamba-1's selective scan as Pallas Triton kernels (GPU), forward and backward.

Computes, as ``reference.selective_scan_naive`` (shapes and dtypes there)::

    dt_t = softplus(delta_t + delta_bias)          (or delta_t + delta_bias)
    h_t  = exp(dt_t A) * h_{t-1} + dt_t B_t u_t    h: [Dm, N] per batch row, float32
    y_t  = (C_t . h_t + D u_t) * silu(z_t)

One program per (batch row, block of ``block_d`` channels of one group, time segment). The
state ``h [block_d, N]`` stays in registers while the program walks its segment: a
``fori_loop`` over chunks of ``chunk`` steps, each chunk unrolled so that the row loads of
its steps do not wait on the recurrence and issue together. Discretisation (bias,
softplus), the D skip and the z gate are fused; nothing of size ``[B, T, Dm, N]`` touches
memory.

Time segments (``Blocks.segments``; by default enough for ``min_programs`` programs) give
parallelism when batch x channel blocks are few: a first pass finds each segment's end
state from a zero start and its total decay ``exp(A sum dt)``, XLA chains them into every
segment's start state, and the main pass runs from those.

The forward for training saves the state at every chunk start, ``[B, T/chunk, Dm, N]``
float32. The backward walks each segment's chunks in reverse: from the saved state it
re-runs the chunk forward (keeping the states at ``bwd_tile`` boundaries), then per tile
re-runs ``bwd_tile`` steps holding their states and decays in registers and applies the
adjoint recurrence ``g_{t-1} = exp(dt_t A) (g_t + C_t dy_t)`` backwards through them. With
several segments a reverse pass first finds each segment's adjoint from a zero end, and XLA
chains them (through the same decays) into every segment's end adjoint. dA, dD and
d delta_bias accumulate per program (summed in XLA); dB and dC are per-channel-block
partial sums ``[B, n_blocks, T, N]`` that XLA adds over each group's blocks: deterministic,
no atomics.

Speed (H200, [8, 4096, 1536, 16] bf16): these "blocked" kernels take 4.76 ms forward and
14.9 ms forward+backward, ~50x and ~80x the time to read the inputs and write the outputs
once: latency-bound, each step's loads wait behind the previous step's store and the
step's dependent chain (~2k clocks a step, 4096 steps). ``Blocks(algorithm="lanes")``
(``LANES_BLOCKS``, in ``triton_lanes.py``, with the roofline of both) is the GPU default
since it was measured faster in the same run: 2.98 ms forward, 11.6 ms forward+backward
(predicted ~0.35 / ~1.9 ms; chunks of 16 gave 1.56 ms forward but 17.1 ms
forward+backward). Both are far from the issue's targets (BENCHMARKS.md).
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

from seqmix.kernels.dispatch import interpret_mode

_LOG2E = math.log2(math.e)


@dataclasses.dataclass(frozen=True)
class Blocks:
    """Tile sizes. ``block_d`` (a power of 2) is shrunk to divide the channels per group;
    ``bwd_tile`` must divide ``chunk``; ``segments`` (None: the fewest, at least 4 chunks
    long, that give ``min_programs`` programs) splits time; T is padded to a multiple of
    ``chunk * segments``. ``algorithm``: "blocked" (these kernels, the state
    ``[block_d, N]`` spread over the warps) or "lanes" (``triton_lanes``: the state
    ``[N, block_d]`` with one channel per lane, meant for ``block_d = 32 x num_warps``;
    use ``LANES_BLOCKS``)."""

    block_d: int = 32
    chunk: int = 16
    bwd_tile: int = 8
    num_warps: int = 4
    bwd_num_warps: int = 4
    num_stages: int = 1
    segments: int | None = None
    min_programs: int = 264  # two per SM of an H100 / H200
    algorithm: str = "blocked"


# The GPU default since the H200 run of 2026-11-28: one channel per lane, one warp per
# program; 2.98 ms forward, 11.6 ms forward+backward at [8, 4096, 1536, 16] against the
# blocked kernels' 4.76 / 14.9 ms in the same run (the roofline in triton_lanes.py had
# predicted ~0.35 / ~1.9 ms: still latency-bound). Chunks of 8 (checkpoints every 8 steps)
# keep the backward's held states to 5 x 16 registers a lane.
LANES_BLOCKS = Blocks(
    algorithm="lanes", block_d=32, chunk=8, bwd_tile=4, num_warps=1, bwd_num_warps=1
)
BLOCKED_BLOCKS = Blocks()
GPU_BLOCKS = LANES_BLOCKS
# Interpret mode compiles the unrolled body on the CPU: short chunks keep tests fast (the
# lanes kernels have tests of their own with their blocks given).
INTERPRET_BLOCKS = Blocks(block_d=8, chunk=2, bwd_tile=1, segments=1)
_ALGORITHMS = ("blocked", "lanes")


@dataclasses.dataclass(frozen=True)
class _Static:
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


def _pow2_divisor(n: int, cap: int) -> int:
    """The largest power of 2 that divides n and is <= cap."""
    b = 1
    while b * 2 <= cap and n % (b * 2) == 0:
        b *= 2
    return b


def _segments(blocks: Blocks, programs: int, n_chunks: int) -> int:
    if blocks.segments is not None:
        return max(1, blocks.segments)
    s = 1
    while programs * s < blocks.min_programs and n_chunks // (2 * s) >= 4:
        s *= 2
    return s


def _no_float64(*arrays) -> None:
    if any(a is not None and a.dtype == jnp.float64 for a in arrays):
        raise NotImplementedError(
            "the Pallas kernels compute in float32; float64 inputs need "
            "the naive or xla implementation"
        )


def _softplus(x):
    return jnp.maximum(x, 0.0) + jnp.log1p(jnp.exp(-jnp.abs(x)))


def _row(ref, t):
    return ref[t].astype(jnp.float32)


class _Refs:
    """Named access to the kernel's refs; absent (or not passed) operands are None."""

    def __init__(self, refs, names):
        it = iter(refs)
        for name, present in names:
            setattr(self, name, next(it) if present else None)

    def __getattr__(self, name):  # only called for names not set above
        return None


class _Block:
    """What a program reads once: A (and A log2 e), delta_bias, D; and its steps' rows."""

    def __init__(self, r, st: _Static):
        self.r, self.st = r, st
        self.A = r.A[...].astype(jnp.float32)
        self.A2 = self.A * _LOG2E
        self.bias = r.bias[...].astype(jnp.float32) if r.bias is not None else None
        self.D = r.D[...].astype(jnp.float32) if r.D is not None else None
        self.t0 = pl.program_id(2) * st.seg_len  # first step of this segment

    def dt(self, t):
        """(x, dt) of local step t: x = delta + bias, dt = softplus(x) or x (0 when padding)."""
        x = _row(self.r.delta, t)
        if self.bias is not None:
            x = x + self.bias
        dt = _softplus(x) if self.st.softplus else x
        if self.st.padded:
            dt = jnp.where(self.t0 + t < self.st.T, dt, 0.0)
        return x, dt

    def step(self, t, h):
        """h_t from h_{t-1}; also returns (x, dt, u, B_t, decay) of the step."""
        x, dt = self.dt(t)
        u = _row(self.r.u, t)
        Bt = _row(self.r.B, t)
        a = jnp.exp2(dt[:, None] * self.A2)
        return a * h + (dt * u)[:, None] * Bt[None, :], (x, dt, u, Bt, a)

    def gated_dy(self, t):
        """dL/d(C.h + D u) at step t and, with z, (dL/dy_t, z, sigmoid z)."""
        dy = _row(self.r.dy, t)
        if self.r.z is None:
            return dy, None
        zt = _row(self.r.z, t)
        sz = jax.nn.sigmoid(zt)
        return dy * zt * sz, (dy, zt, sz)


def _zeros_state(blk):
    return jnp.zeros(blk.A.shape, jnp.float32)


def _fwd_kernel(*refs, st: _Static, names):
    """The main forward over one segment (from its start state ``h_in``, zero without);
    or, without ``y`` among the outputs, the first pass of segmented runs (the end state
    from a zero start and the sum of dt)."""
    r = _Refs(refs, names)
    blk = _Block(r, st)
    h = r.h_in[...].astype(jnp.float32) if r.h_in is not None else _zeros_state(blk)
    dtsum = jnp.zeros(blk.A.shape[:1], jnp.float32)

    def chunk_body(k, carry):
        h, dtsum = carry
        if r.ckpt is not None:
            r.ckpt[k] = h
        for i in range(st.chunk):
            t = k * st.chunk + i
            h, (_, dt, u, _, _) = blk.step(t, h)
            if r.y is None:
                dtsum = dtsum + dt
                continue
            y = jnp.sum(h * _row(r.C, t)[None, :], axis=1)
            if blk.D is not None:
                y = y + blk.D * u
            if r.z is not None:
                y = y * jax.nn.silu(_row(r.z, t))
            r.y[t] = y.astype(r.y.dtype)
        return h, dtsum

    h, dtsum = lax.fori_loop(0, st.seg_len // st.chunk, chunk_body, (h, dtsum))
    r.h_out[...] = h
    if r.dtsum is not None:
        r.dtsum[...] = dtsum


def _adjoint_kernel(*refs, st: _Static, names):
    """First backward pass: the adjoint entering this segment from its own outputs alone,
    ``g_{t-1} = exp(dt_t A) (g_t + C_t dy_t)`` from ``g = 0`` at the segment end."""
    r = _Refs(refs, names)
    blk = _Block(r, st)

    def chunk_body(kk, g):
        k = st.seg_len // st.chunk - 1 - kk
        for i in reversed(range(st.chunk)):
            t = k * st.chunk + i
            _, dt = blk.dt(t)
            dy, _ = blk.gated_dy(t)
            g = jnp.exp2(dt[:, None] * blk.A2) * (g + dy[:, None] * _row(r.C, t)[None, :])
        return g

    r.g_loc[...] = lax.fori_loop(0, st.seg_len // st.chunk, chunk_body, _zeros_state(blk))


def _bwd_kernel(*refs, st: _Static, names):
    r = _Refs(refs, names)
    blk = _Block(r, st)
    n_chunks = st.seg_len // st.chunk
    tiles = st.chunk // st.bwd_tile
    zeros_d = jnp.zeros(blk.A.shape[:1], jnp.float32)

    def chunk_body(kk, carry):
        g, dA, dD, dbias = carry  # g = dL/dh at the end of this chunk (from later steps)
        k = n_chunks - 1 - kk
        h = r.ckpt[k]
        starts = [h]
        for j in range(tiles - 1):
            for i in range(st.bwd_tile):
                h, _ = blk.step(k * st.chunk + j * st.bwd_tile + i, h)
            starts.append(h)
        for j in reversed(range(tiles)):
            hs = [starts[j]]
            saved = []
            for i in range(st.bwd_tile):
                t = k * st.chunk + j * st.bwd_tile + i
                h, s = blk.step(t, hs[-1])
                hs.append(h)
                saved.append((t, *s))
            for i in reversed(range(st.bwd_tile)):
                t, x, dt, u, Bt, a = saved[i]
                h_t, h_prev = hs[i + 1], hs[i]
                Ct = _row(r.C, t)
                dy, zs = blk.gated_dy(t)
                if zs is not None:
                    dout, zt, sz = zs
                    y = jnp.sum(h_t * Ct[None, :], axis=1)
                    if blk.D is not None:
                        y = y + blk.D * u
                    dz = dout * y * sz * (1.0 + zt * (1.0 - sz))
                    r.dz[t] = dz.astype(r.dz.dtype)
                q = g + dy[:, None] * Ct[None, :]  # dL/dh_t
                r.dC[t] = jnp.sum(dy[:, None] * h_t, axis=0)
                r.dB[t] = jnp.sum(q * (dt * u)[:, None], axis=0)
                qB = jnp.sum(q * Bt[None, :], axis=1)
                qah = q * (a * h_prev)
                dA = dA + qah * dt[:, None]
                ddt = jnp.sum(qah * blk.A, axis=1) + u * qB
                du = dt * qB
                if blk.D is not None:
                    du = du + blk.D * dy
                    dD = dD + dy * u
                if st.softplus:
                    ddt = ddt * jax.nn.sigmoid(x)
                if st.padded:
                    ddt = jnp.where(blk.t0 + t < st.T, ddt, 0.0)
                dbias = dbias + ddt
                r.du[t] = du.astype(r.du.dtype)
                r.ddelta[t] = ddt.astype(r.ddelta.dtype)
                g = a * q
        return g, dA, dD, dbias

    init = (r.g_end[...].astype(jnp.float32), _zeros_state(blk), zeros_d, zeros_d)
    g, dA, dD, dbias = lax.fori_loop(0, n_chunks, chunk_body, init)
    r.dA[...] = dA
    r.g_start[...] = g
    if r.dD is not None:
        r.dD[...] = dD
    if r.dbias is not None:
        r.dbias[...] = dbias


class _Call:
    """Block specs and the pallas_call plumbing shared by the kernels; grid (B, nJ, S)."""

    def __init__(self, st: _Static, Bsz: int, Tp: int, Dm: int, N: int):
        self.st, self.Bsz, self.Tp, self.Dm, self.N = st, Bsz, Tp, Dm, N
        self.nJ = Dm // st.block_d
        self.S = Tp // st.seg_len
        bd, gb, L, nk = st.block_d, st.group_blocks, st.seg_len, st.seg_len // st.chunk
        self.spec = dict(
            seq=pl.BlockSpec((None, L, bd), lambda b, j, s: (b, s, j)),
            grp=pl.BlockSpec((None, L, None, N), lambda b, j, s: (b, s, j // gb, 0)),
            mat=pl.BlockSpec((bd, N), lambda b, j, s: (j, 0)),
            vec=pl.BlockSpec((bd,), lambda b, j, s: (j,)),
            seg_state=pl.BlockSpec((None, None, bd, N), lambda b, j, s: (b, s, j, 0)),
            seg_vec=pl.BlockSpec((None, None, bd), lambda b, j, s: (b, s, j)),
            ckpt=pl.BlockSpec((None, nk, bd, N), lambda b, j, s: (b, s, j, 0)),
            part=pl.BlockSpec((None, None, L, N), lambda b, j, s: (b, j, s, 0)),
        )

    def shape(self, kind, dtype=jnp.float32):
        B, S, Dm, N = self.Bsz, self.S, self.Dm, self.N
        return jax.ShapeDtypeStruct(
            {
                "seg_state": (B, S, Dm, N),
                "seg_vec": (B, S, Dm),
                "ckpt": (B, self.Tp // self.st.chunk, Dm, N),
                "part": (B, self.nJ, self.Tp, N),
                "seq": (B, self.Tp, Dm),
            }[kind],
            dtype,
        )

    def __call__(self, kernel, name, ins, outs, num_warps):
        """``ins``: (name, array or None, spec kind); ``outs``: (name, shape or None, kind)."""
        names = tuple((n, x is not None) for n, x, _ in ins) + tuple(
            (n, s is not None) for n, s, _ in outs
        )
        got = pl.pallas_call(
            functools.partial(kernel, st=self.st, names=names),
            grid=(self.Bsz, self.nJ, self.S),
            in_specs=[self.spec[k] for _, x, k in ins if x is not None],
            out_specs=[self.spec[k] for _, s, k in outs if s is not None],
            out_shape=[s for _, s, _ in outs if s is not None],
            interpret=self.st.interpret,
            compiler_params=plgpu.CompilerParams(
                num_warps=num_warps, num_stages=self.st.num_stages
            ),
            name=name,
        )(*[x for _, x, _ in ins if x is not None])
        it = iter(got)
        return {n: (next(it) if s is not None else None) for n, s, _ in outs}


def _chain(decay, local, first, reverse):
    """Chains per-segment results through the segment decays ``exp(A sum dt)``.

    Forward: ``start[0] = first``, ``start[s] = decay[s-1] start[s-1] + local[s-1]``.
    Reverse: ``end[S-1] = first``, ``end[s-1] = decay[s] end[s] + local[s]``.
    ``decay`` and ``local`` are ``[B, S, ...]`` in the state layout of the kernels
    (``[Dm, N]`` here, ``[N, Dm]`` in ``triton_lanes``); returns the starts (ends).
    """
    xs = (jnp.moveaxis(decay, 1, 0), jnp.moveaxis(local, 1, 0))

    def step(carry, x):
        d, loc = x
        return d * carry + loc, carry

    _, out = lax.scan(step, first, xs, reverse=reverse)
    return jnp.moveaxis(out, 0, 1)


def _segment_decay(A, dtsum):
    """``exp(A sum dt)`` per segment, ``[B, S, Dm, N]``."""
    return jnp.exp(dtsum[..., None] * A.astype(jnp.float32))


def _forward(st: _Static, u, delta, A, B, C, D, z, bias, h0, save: bool):
    Bsz, Tp, Dm = u.shape
    N = A.shape[1]
    call = _Call(st, Bsz, Tp, Dm, N)
    common = [("u", u, "seq"), ("delta", delta, "seq"), ("A", A, "mat"), ("B", B, "grp")]
    h_in = None if h0 is None else h0[:, None]
    dtsum = None
    if call.S > 1:
        loc = call(
            _fwd_kernel,
            "selective_scan_local",
            common + [("bias", bias, "vec")],
            [
                ("h_out", call.shape("seg_state"), "seg_state"),
                ("dtsum", call.shape("seg_vec"), "seg_vec"),
            ],
            st.num_warps,
        )
        dtsum = loc["dtsum"]
        first = jnp.zeros((Bsz, Dm, N), jnp.float32) if h0 is None else h0
        h_in = _chain(_segment_decay(A, dtsum), loc["h_out"], first, reverse=False)
    ins = common + [
        ("C", C, "grp"),
        ("D", D, "vec"),
        ("z", z, "seq"),
        ("bias", bias, "vec"),
        ("h_in", h_in, "seg_state"),
    ]
    outs = [
        ("y", call.shape("seq", u.dtype), "seq"),
        ("h_out", call.shape("seg_state"), "seg_state"),
        ("ckpt", call.shape("ckpt") if save else None, "ckpt"),
    ]
    got = call(_fwd_kernel, "selective_scan_fwd", ins, outs, st.num_warps)
    return got["y"], got["h_out"][:, -1], got["ckpt"], dtsum


def _backward(st: _Static, res, dy, dhT):
    u, delta, A, B, C, D, z, bias, h0, ckpt, dtsum = res
    Bsz, Tp, Dm = u.shape
    G, N = B.shape[2], A.shape[1]
    call = _Call(st, Bsz, Tp, Dm, N)
    g_end = dhT[:, None]
    if call.S > 1:
        ins = [
            ("delta", delta, "seq"),
            ("A", A, "mat"),
            ("C", C, "grp"),
            ("z", z, "seq"),
            ("bias", bias, "vec"),
            ("dy", dy, "seq"),
        ]
        g_loc = call(
            _adjoint_kernel,
            "selective_scan_adjoint",
            ins,
            [("g_loc", call.shape("seg_state"), "seg_state")],
            st.bwd_num_warps,
        )["g_loc"]
        g_end = _chain(_segment_decay(A, dtsum), g_loc, dhT, reverse=True)
    ins = [
        ("u", u, "seq"),
        ("delta", delta, "seq"),
        ("A", A, "mat"),
        ("B", B, "grp"),
        ("C", C, "grp"),
        ("D", D, "vec"),
        ("z", z, "seq"),
        ("bias", bias, "vec"),
        ("ckpt", ckpt, "ckpt"),
        ("dy", dy, "seq"),
        ("g_end", g_end, "seg_state"),
    ]
    outs = [
        ("du", call.shape("seq", u.dtype), "seq"),
        ("ddelta", call.shape("seq", delta.dtype), "seq"),
        ("dz", call.shape("seq", z.dtype) if z is not None else None, "seq"),
        ("dB", call.shape("part"), "part"),
        ("dC", call.shape("part"), "part"),
        ("dA", call.shape("seg_state"), "seg_state"),
        ("g_start", call.shape("seg_state"), "seg_state"),
        ("dD", call.shape("seg_vec") if D is not None else None, "seg_vec"),
        ("dbias", call.shape("seg_vec") if bias is not None else None, "seg_vec"),
    ]
    g = call(_bwd_kernel, "selective_scan_bwd", ins, outs, st.bwd_num_warps)
    nJ = call.nJ

    def groups(part):  # [B, nJ, Tp, N] -> [B, Tp, G, N]
        return part.reshape(Bsz, G, nJ // G, Tp, N).sum(2).transpose(0, 2, 1, 3)

    def total(x, like):
        return None if like is None else x.sum((0, 1)).astype(like.dtype)

    dh0 = None if h0 is None else g["g_start"][:, 0].astype(h0.dtype)
    return (
        g["du"],
        g["ddelta"],
        total(g["dA"], A),
        groups(g["dB"]).astype(B.dtype),
        groups(g["dC"]).astype(C.dtype),
        total(g["dD"], D),
        g["dz"],
        total(g["dbias"], bias),
        dh0,
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _scan(st, u, delta, A, B, C, D, z, bias, h0):
    y, hT, _, _ = _forward(st, u, delta, A, B, C, D, z, bias, h0, save=False)
    return y, hT


def _scan_fwd(st, u, delta, A, B, C, D, z, bias, h0):
    y, hT, ckpt, dtsum = _forward(st, u, delta, A, B, C, D, z, bias, h0, save=True)
    return (y, hT), (u, delta, A, B, C, D, z, bias, h0, ckpt, dtsum)


def _scan_bwd(st, res, cts):
    dy, dhT = cts
    return _backward(st, res, dy, dhT.astype(jnp.float32))


_scan.defvjp(_scan_fwd, _scan_bwd)


def selective_scan(
    u,
    delta,
    A,
    B,
    C,
    D=None,
    z=None,
    *,
    delta_bias=None,
    delta_softplus=False,
    initial_state=None,
    blocks: Blocks | None = None,
):
    """The ``pallas_triton`` implementation (arguments as ``reference.selective_scan_naive``).

    Returns ``(y [B, T, Dm] in u's dtype, final_state [B, Dm, N] float32)``; differentiable
    in every array argument. ``blocks`` overrides the tile sizes.
    """
    _no_float64(u, delta, A, B, C, D, z, delta_bias, initial_state)
    interpret = interpret_mode()
    blocks = blocks or (INTERPRET_BLOCKS if interpret else GPU_BLOCKS)
    if blocks.algorithm not in _ALGORITHMS:
        raise ValueError(f"blocks.algorithm must be one of {_ALGORITHMS}, got {blocks.algorithm!r}")
    if blocks.chunk % blocks.bwd_tile:
        raise ValueError(
            f"blocks.bwd_tile ({blocks.bwd_tile}) must divide blocks.chunk ({blocks.chunk})"
        )
    Bsz, T, Dm = u.shape
    N = A.shape[1]
    G = B.shape[2]
    Dg = Dm // G
    bd = _pow2_divisor(Dg, blocks.block_d)
    S = _segments(blocks, Bsz * (Dm // bd), -(-T // blocks.chunk))
    L = -(-T // (blocks.chunk * S)) * blocks.chunk
    Tp = L * S
    st = _Static(
        T=T,
        padded=Tp != T,
        seg_len=L,
        softplus=bool(delta_softplus),
        block_d=bd,
        group_blocks=Dg // bd,
        chunk=blocks.chunk,
        bwd_tile=blocks.bwd_tile,
        num_warps=blocks.num_warps,
        bwd_num_warps=blocks.bwd_num_warps,
        num_stages=blocks.num_stages,
        interpret=interpret,
    )
    Np = pl.next_power_of_2(N)

    def pad_t(x):
        return (
            x
            if x is None or Tp == T
            else jnp.pad(x, [(0, 0), (0, Tp - T)] + [(0, 0)] * (x.ndim - 2))
        )

    def pad_n(x):
        return x if x is None or Np == N else jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, Np - N)])

    if blocks.algorithm == "lanes":
        from seqmix.kernels.selective_scan import triton_lanes

        scan = triton_lanes.scan
    else:
        scan = _scan
    y, hT = scan(
        st,
        pad_t(u),
        pad_t(delta),
        pad_n(A),
        pad_n(pad_t(B)),
        pad_n(pad_t(C)),
        D,
        pad_t(z),
        delta_bias,
        pad_n(initial_state),
    )
    return y[:, :T], hT[..., :N]
