"""Mamba-1's selective scan as Pallas Triton kernels with one channel per lane, forward (with
checkpoints for training) and backward: the training path of
``TritonConfig(algorithm="lanes")`` (``ops.py``: the primal-only call runs the chunked
forward either way). Tiles and plumbing: ``lanes_tiles.py`` (``GPU_TILES``).

Same op as the chunked kernels (formula in ``__init__``). One program per (batch row,
``block_d`` channels, time segment), and the state is held transposed, ``h [N, block_d]``,
with ``block_d = 32 x num_warps``: Triton's default layout then gives each lane one channel
and all N of its states, so ``C_t . h_t`` (and the backward's ``q . B``, ``q a h . A``) are
sums inside a thread, and every ``[block_d]`` row (u, delta, z, dy, y, du, ...) is one
element per lane, computed once (the earlier "blocked" kernels spread ``[32, 16]`` over 128
threads: the C.h sum crossed lanes, rows were replicated across threads, and row and state
layouts could differ, so steps converted layouts).

A chunk of ``chunk`` steps is unrolled. The forward loads the next chunk's u / delta / z
rows while it computes this one (carried through the loop) and stores its y rows after its
last step, so no store sits between loads and the per-step B_t / C_t loads can be issued
early. Inside a step only ``h = a * h + b`` depends on the previous step:
``a = exp2(dt A log2 e)``, ``b = dt u B_t``, the softplus and the gate are off that chain,
and ``y_t`` feeds nothing later. Global memory is only ever touched in rows (``[block_d]``
or ``[N]``); a ``[N, block_d]`` block is N rows: a 2D load or store would get a coalesced
layout of its own (4 channels x 4 states a thread) that Triton would spread into the loop.

Backward: per chunk, in reverse, the chunk's rows are loaded first; from the checkpointed
chunk-start state (``[B, T/chunk, N, Dm]`` float32, written by the forward for training) a
pass keeps the states at ``bwd_tile`` boundaries; per tile, the tile's states are
recomputed and held (with ``C_t . h_t`` for dz), then the adjoint
``q_t = g_t + C_t dpre_t``, ``g_{t-1} = a_t q_t`` runs back through them with
``a_t h_{t-1}`` formed as in the forward (no division, no subtraction). dB and dC are the
per-step sums over the program's channels (across lanes), written as per-program partial
rows that XLA adds; dA, dD, d delta_bias are per program, summed in XLA. Time segments
(few programs): a local pass, an XLA chain, the main pass; the backward's end adjoints the
same way (``lanes_tiles``).

Measured (H200, 2026-11-28, [8, 4096, 1536, 16]): 2.98 ms forward and 11.6 ms
forward+backward (a second run the same day: 3.05 / 11.6 ms; the blocked kernels: 4.76 /
14.9 ms in the same run); chunks of 16: 1.56 ms forward, 17.1 ms forward+backward. The
roofline below, written before that run, predicted 0.33-0.45 ms and 1.5-3 ms: the kernels
are still ~8x off it, so the per-step latency and not the SFU or issue rate is the limit.
The chunked two-level scan (parallel prefix inside a chunk) that followed has the faster
forward (2.56 ms on an H100) but a slower backward (forward+backward 14.6 ms on an H100),
hence this backward for training.

Roofline at [B, T, Dm, N] = [8, 4096, 1536, 16], bf16, softplus, D and z (the benchmark
shape; H200: 132 SMs x 4 sub-partitions at ~1.98 GHz; the SFU does 16 exp2 / SM / clock,
so one warp-wide exp2 per 8 clocks per sub-partition; 4.27 TB/s copy):

- Bytes. The forward reads u, delta, z (3 x 2 B x 50.3M) and writes y: 0.40 GB, 0.095 ms at
  copy speed; forward+backward (y, du, d delta, dz, dy too): 0.81 GB, 0.19 ms. The
  checkpoints (chunk 8) add 0.40 GB written and read back, the dB / dC partials 0.2 GB;
  both overlap compute (the kernels are not memory-bound: ~1.2 TB/s at most).
- Blocked (the earlier kernels): 384 programs of 4 warps, each 4096 dependent steps. A
  step's row loads come after the previous step's y store (the compiler cannot move a load
  above a store that may alias), so each step costs a global-load latency (~0.5-1k clocks)
  plus the softplus -> exp2 -> FMA -> cross-lane C.h sum -> gate chain: ~2.3k clocks x 4096
  steps = 4.75 ms (measured: 4.75 ms forward, 14.9 ms forward+backward). By the count of
  its instructions the SMs are busy ~10% of that time: latency, not throughput, is the
  limit.
- Lanes, forward: per step and lane 16 x (mul, exp2, mul, FMA, FMA) plus softplus and silu:
  ~20 SFU ops (160 clocks) in ~120 issue slots, so SFU-bound at ~160 clocks per step per
  warp. 384 one-warp programs (<= 528 sub-partitions, one each) x 4096 steps x 160 clocks
  = 0.33 ms (3.5x read-once-write-once; 0.24 ms if every sub-partition had a warp).
  Expected 0.33-0.45 ms: 10-14x the blocked kernels, 11-15x XLA (5.08 ms).
- Lanes, backward: per step and lane 1.5 forward recomputes (the chunk pass covers half of
  each chunk of 8) and the adjoint: ~48 SFU ops (~390 clocks) and ~700 issue slots, 320 of
  them the 5-level shuffle sums over 32 lanes of the 16 dB and 16 dC values (Triton
  reduces each value separately). Issue-bound at ~700 clocks per step: 4096 x 700 / 1.98
  GHz = 1.45 ms. Forward+backward ~0.37 + 1.45 + 0.05 (XLA sums) = ~1.9 ms, expected
  1.5-3 ms: 5-10x the blocked kernels (14.9 ms), 16-32x XLA (48.2 ms), 8-15x
  read-once-write-once. Within 3x of read-once-write-once (0.57 ms) is out of reach of this
  design: >= 2 exp2 per element and the per-step sums over channels for dB and dC alone
  need ~0.5 ms.
- At [2, 16384]: 96 programs, so 4 time segments (384 programs); the local passes add
  ~0.8 of a forward and ~0.3 of a backward.

Check these with the ``pallas_triton[lanes]`` row of the selective_scan benchmark. A
forward far above 0.45 ms means the layout is not one channel per lane (look at the TTGIR)
or the loads are not hoisted; a backward far above 3 ms, register spills (chunk 16 holds
more states; ``bwd_tile`` 2 holds fewer).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from seqmix.kernels.common import softplus
from seqmix.kernels.selective_scan.triton.lanes_tiles import (
    Call,
    Static,
    chain,
    get_state,
    row,
    segment_decay,
    set_state,
)
from seqmix.kernels.selective_scan.triton.tiles import Refs

_LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)


class _Lane:
    """What a program reads once (A^T log2 e, delta_bias, D) and the per-step maps."""

    def __init__(self, r, st: Static):
        self.r, self.st = r, st
        N, bd = r.A.shape
        self.A2 = get_state(r.A, N, bd) * _LOG2E  # [N, bd]
        self.bias = r.bias[...].astype(jnp.float32) if r.bias is not None else None
        self.D = r.D[...].astype(jnp.float32) if r.D is not None else None
        self.t0 = pl.program_id(2) * st.seg_len  # first step of this segment

    def dt(self, x_row, t):
        """(x, dt) of local step t from its delta row: x = delta + bias, dt = softplus(x)
        or x, 0 on padding steps."""
        x = x_row if self.bias is None else x_row + self.bias
        dt = softplus(x) if self.st.softplus else x
        if self.st.padded:
            dt = jnp.where(self.t0 + t < self.st.T, dt, 0.0)
        return x, dt

    def decay(self, dt):
        """``exp(dt A)`` as ``[N, bd]``."""
        return jnp.exp2(dt[None, :] * self.A2)

    def drive(self, dt, u, t):
        """``dt u B_t`` as ``[N, bd]``."""
        return (dt * u)[None, :] * row(self.r.B, t)[:, None]

    def gate(self, dout, z):
        """dL/d(C.h + D u) from dL/dy, and silu's factor for dz (None without z)."""
        if z is None:
            return dout, None
        sz = jax.nn.sigmoid(z)
        return dout * z * sz, sz * (1.0 + z * (1.0 - sz))


def _fwd_kernel(*refs, st, names):
    """The main forward over one segment (from ``h_in``, zero without); without ``y`` among
    the outputs, the first pass of segmented runs (end state from zero, and sum of dt)."""
    r = Refs(refs, names)
    ln = _Lane(r, st)
    h = get_state(r.h_in, *ln.A2.shape) if r.h_in is not None else jnp.zeros_like(ln.A2)
    dtsum = jnp.zeros(ln.A2.shape[1:], jnp.float32)
    gate = r.y is not None and r.z is not None
    n_chunks = st.seg_len // st.chunk
    row_refs = (r.delta, r.u) + ((r.z,) if gate else ())

    def load_rows(k):  # raw [bd] rows of chunk k, for (delta, u[, z])
        return [tuple(ref[k * st.chunk + i] for ref in row_refs) for i in range(st.chunk)]

    def chunk_body(k, carry):
        h, dtsum, rows = carry
        base = k * st.chunk
        if r.ckpt is not None:
            set_state(r.ckpt, h, k)
        # The next chunk's rows, a whole chunk of work ahead of their use (the last chunk
        # re-reads itself).
        ahead = load_rows(jnp.minimum(k + 1, n_chunks - 1))
        ys = []
        for i, raw in enumerate(rows):
            t = base + i
            x_row, u = raw[0].astype(jnp.float32), raw[1].astype(jnp.float32)
            _, dt = ln.dt(x_row, t)
            h = ln.decay(dt) * h + ln.drive(dt, u, t)
            if r.y is None:
                dtsum = dtsum + dt
                continue
            y = jnp.sum(h * row(r.C, t)[:, None], axis=0)
            if ln.D is not None:
                y = y + ln.D * u
            if gate:
                y = y * jax.nn.silu(raw[2].astype(jnp.float32))
            ys.append(y.astype(r.y.dtype))
        for i, y in enumerate(ys):  # after every load of the chunk
            r.y[base + i] = y
        return h, dtsum, ahead

    h, dtsum, _ = lax.fori_loop(0, n_chunks, chunk_body, (h, dtsum, load_rows(0)))
    set_state(r.h_out, h)
    if r.dtsum is not None:
        r.dtsum[...] = dtsum


def _adjoint_kernel(*refs, st, names):
    """First backward pass of segmented runs: the adjoint entering this segment from its own
    outputs alone, ``g_{t-1} = a_t (g_t + C_t dpre_t)`` from ``g = 0`` at its end."""
    r = Refs(refs, names)
    ln = _Lane(r, st)

    def chunk_body(kk, g):
        base = (st.seg_len // st.chunk - 1 - kk) * st.chunk
        rows = [
            (
                row(r.delta, base + i),
                row(r.dy, base + i),
                row(r.z, base + i) if r.z is not None else None,
            )
            for i in range(st.chunk)
        ]
        for i in reversed(range(st.chunk)):
            t = base + i
            x_row, dout, z = rows[i]
            _, dt = ln.dt(x_row, t)
            dpre, _ = ln.gate(dout, z)
            g = ln.decay(dt) * (g + dpre[None, :] * row(r.C, t)[:, None])
        return g

    g = lax.fori_loop(0, st.seg_len // st.chunk, chunk_body, jnp.zeros_like(ln.A2))
    set_state(r.g_loc, g)


def _bwd_kernel(*refs, st, names):
    r = Refs(refs, names)
    ln = _Lane(r, st)
    n_chunks = st.seg_len // st.chunk
    tiles = st.chunk // st.bwd_tile
    zeros_d = jnp.zeros(ln.A2.shape[1:], jnp.float32)

    def output(t, u, h_t):
        """``C_t . h_t + D u_t`` (before the gate), for dz."""
        pre = jnp.sum(h_t * row(r.C, t)[:, None], axis=0)
        return pre if ln.D is None else pre + ln.D * u

    def adjoint_step(t, rows, x, dt, pre, h_t, h_prev, carry):
        """dL/d(inputs) of step t given g = dL/dh_t from later steps; returns the new carry
        with g = dL/dh_{t-1}."""
        g, dA, dD, dbias = carry
        _, u, z, dout = rows
        Bt, Ct = row(r.B, t), row(r.C, t)
        a = ln.decay(dt)
        dpre, dsilu = ln.gate(dout, z)
        if z is not None:
            r.dz[t] = (dout * pre * dsilu).astype(r.dz.dtype)
        q = g + dpre[None, :] * Ct[:, None]  # dL/dh_t
        r.dC[t] = jnp.sum(dpre[None, :] * h_t, axis=1)  # over the program's channels
        r.dB[t] = jnp.sum(q * (dt * u)[None, :], axis=1)
        qB = jnp.sum(q * Bt[:, None], axis=0)
        qah = q * (a * h_prev)  # dL/da_t * a_t
        dA = dA + qah * dt[None, :]
        ddt = jnp.sum(qah * ln.A2, axis=0) * _LN2 + u * qB
        du = dt * qB
        if ln.D is not None:
            du = du + ln.D * dpre
            dD = dD + dpre * u
        if st.softplus:
            ddt = ddt * jnp.exp(x - dt)  # sigmoid(x) = exp(x - softplus(x))
        if st.padded:
            ddt = jnp.where(ln.t0 + t < st.T, ddt, 0.0)
        r.du[t] = du.astype(r.du.dtype)
        r.ddelta[t] = ddt.astype(r.ddelta.dtype)
        return a * q, dA, dD, dbias + ddt

    def chunk_body(kk, carry):
        base = (n_chunks - 1 - kk) * st.chunk
        # Every row of the chunk, loaded before any store of it.
        rows = [
            (
                row(r.delta, base + i),
                row(r.u, base + i),
                row(r.z, base + i) if r.z is not None else None,
                row(r.dy, base + i),
            )
            for i in range(st.chunk)
        ]
        # States at the tile starts, forward from the chunk's checkpoint (tile 0 re-reads it).
        starts = [None]
        h = get_state(r.ckpt, *ln.A2.shape, n_chunks - 1 - kk)
        for i in range((tiles - 1) * st.bwd_tile):
            _, dt = ln.dt(rows[i][0], base + i)
            h = ln.decay(dt) * h + ln.drive(dt, rows[i][1], base + i)
            if (i + 1) % st.bwd_tile == 0:
                starts.append(h)
        for j in reversed(range(tiles)):
            ts = [base + j * st.bwd_tile + i for i in range(st.bwd_tile)]
            h = get_state(r.ckpt, *ln.A2.shape, n_chunks - 1 - kk) if j == 0 else starts[j]
            hs, xdt = [h], []
            for t, rw in zip(ts, rows[j * st.bwd_tile : (j + 1) * st.bwd_tile], strict=True):
                x, dt = ln.dt(rw[0], t)
                h = ln.decay(dt) * h + ln.drive(dt, rw[1], t)
                hs.append(h)
                # pre here, in the forward direction: C_t is read before the adjoint's stores.
                xdt.append((x, dt, output(t, rw[1], h) if r.z is not None else None))
            for i in reversed(range(st.bwd_tile)):
                carry = adjoint_step(
                    ts[i], rows[j * st.bwd_tile + i], *xdt[i], hs[i + 1], hs[i], carry
                )
        return carry

    init = (get_state(r.g_end, *ln.A2.shape), jnp.zeros_like(ln.A2), zeros_d, zeros_d)
    g, dA, dD, dbias = lax.fori_loop(0, n_chunks, chunk_body, init)
    set_state(r.dA, dA)
    set_state(r.g_start, g)
    if r.dD is not None:
        r.dD[...] = dD
    if r.dbias is not None:
        r.dbias[...] = dbias


def forward(st: Static, u, delta, AT, B, C, D, z, bias, h0t, save: bool):
    """``(y, final state [B, N, Dm], chunk-start states or None, per-segment sums of dt or
    None)`` on transposed A (``[N, Dm]``) and states (``[B, N, Dm]``), B / C
    ``[B, Tp, G, N]`` float32."""
    Bsz, Tp, Dm = u.shape
    N = AT.shape[0]
    call = Call(st, Bsz, Tp, Dm, N)
    common = [("u", u, "seq"), ("delta", delta, "seq"), ("A", AT, "mat"), ("B", B, "grp")]
    h_in = None if h0t is None else h0t[:, None]
    dtsum = None
    if call.S > 1:
        loc = call(
            _fwd_kernel,
            "selective_scan_lanes_local",
            common + [("bias", bias, "vec")],
            [
                ("h_out", call.shape("seg_state"), "seg_state"),
                ("dtsum", call.shape("seg_vec"), "seg_vec"),
            ],
            st.num_warps,
        )
        dtsum = loc["dtsum"]
        first = jnp.zeros((Bsz, N, Dm), jnp.float32) if h0t is None else h0t
        h_in = chain(segment_decay(AT, dtsum), loc["h_out"], first, reverse=False)
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
    got = call(_fwd_kernel, "selective_scan_lanes_fwd", ins, outs, st.num_warps)
    return got["y"], got["h_out"][:, -1], got["ckpt"], dtsum


def backward(st: Static, u, delta, AT, B, C, D, z, bias, ckpt, dtsum, dy, dhTt):
    """The gradient pieces as a dict (``du, ddelta, dz``; ``dB, dC`` partials
    ``[B, nJ, Tp, N]``; ``dA, g_start`` ``[B, S, N, Dm]``; ``dD, dbias`` ``[B, S, Dm]``),
    and the channel blocks ``nJ``; layouts as ``forward``."""
    Bsz, Tp, Dm = u.shape
    N = AT.shape[0]
    call = Call(st, Bsz, Tp, Dm, N)
    g_end = dhTt[:, None]
    if call.S > 1:
        ins = [
            ("delta", delta, "seq"),
            ("A", AT, "mat"),
            ("C", C, "grp"),
            ("z", z, "seq"),
            ("bias", bias, "vec"),
            ("dy", dy, "seq"),
        ]
        g_loc = call(
            _adjoint_kernel,
            "selective_scan_lanes_adjoint",
            ins,
            [("g_loc", call.shape("seg_state"), "seg_state")],
            st.bwd_num_warps,
        )["g_loc"]
        g_end = chain(segment_decay(AT, dtsum), g_loc, dhTt, reverse=True)
    ins = [
        ("u", u, "seq"),
        ("delta", delta, "seq"),
        ("A", AT, "mat"),
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
    return call(_bwd_kernel, "selective_scan_lanes_bwd", ins, outs, st.bwd_num_warps), call.nJ


def _transposed(A, h0):
    return A.T, (None if h0 is None else jnp.swapaxes(h0, 1, 2).astype(jnp.float32))


def _f32(x):
    return x.astype(jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def scan(st: Static, u, delta, A, B, C, D, z, bias, h0):
    """``(y [B, Tp, Dm], final state [B, Dm, N] float32)`` on padded arguments (``Tp`` the
    length ``lanes_tiles.plan`` gave ``st``, N a power of 2; B / C ``[B, Tp, G, N]``), as
    ``ops._scan``, all by the lanes kernels; ``st`` a ``lanes_tiles.Static``."""
    AT, h0t = _transposed(A, h0)
    y, hT, _, _ = forward(st, u, delta, AT, _f32(B), _f32(C), D, z, bias, h0t, save=False)
    return y, jnp.swapaxes(hT, 1, 2)


def scan_fwd(st: Static, u, delta, A, B, C, D, z, bias, h0):
    """The forward for training: ``scan``'s outputs and the residuals of ``scan_bwd`` (the
    chunk-start states and, with time segments, the segments' sums of dt)."""
    AT, h0t = _transposed(A, h0)
    y, hT, ckpt, dtsum = forward(st, u, delta, AT, _f32(B), _f32(C), D, z, bias, h0t, save=True)
    return (y, jnp.swapaxes(hT, 1, 2)), (u, delta, A, B, C, D, z, bias, h0, ckpt, dtsum)


def scan_bwd(st: Static, res, cts):
    """The cotangents of ``(u, delta, A, B, C, D, z, bias, h0)`` from ``scan_fwd``'s
    residuals and the cotangents of ``(y, final state)``."""
    u, delta, A, B, C, D, z, bias, h0, ckpt, dtsum = res
    dy, dhT = cts
    AT, _ = _transposed(A, None)
    g, nJ = backward(
        st,
        u,
        delta,
        AT,
        _f32(B),
        _f32(C),
        D,
        z,
        bias,
        ckpt,
        dtsum,
        dy,
        jnp.swapaxes(dhT.astype(jnp.float32), 1, 2),
    )
    Bsz, Tp, G, N = B.shape

    def groups(part):  # [B, nJ, Tp, N] -> [B, Tp, G, N]
        return part.reshape(Bsz, G, nJ // G, Tp, N).sum(2).transpose(0, 2, 1, 3)

    def total(x, like):
        return None if like is None else x.sum((0, 1)).astype(like.dtype)

    dA = g["dA"].sum((0, 1)).T.astype(A.dtype)
    dh0 = None if h0 is None else jnp.swapaxes(g["g_start"][:, 0], 1, 2).astype(h0.dtype)
    return (
        g["du"],
        g["ddelta"],
        dA,
        groups(g["dB"]).astype(B.dtype),
        groups(g["dC"]).astype(C.dtype),
        total(g["dD"], D),
        g["dz"],
        total(g["dbias"], bias),
        dh0,
    )


scan.defvjp(scan_fwd, scan_bwd)
