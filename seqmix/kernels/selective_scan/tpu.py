"""Mamba-1's selective scan as Pallas Mosaic TPU kernels, forward and backward.

Computes, as ``reference.selective_scan_naive`` (shapes and dtypes there)::

    dt_t = softplus(delta_t + delta_bias)          (or delta_t + delta_bias)
    h_t  = exp(dt_t A) * h_{t-1} + dt_t B_t u_t    h: [Dm, N] per batch row, float32
    y_t  = (C_t . h_t + D u_t) * silu(z_t)

Layout: the channels of a group are viewed as rows of 128 lanes, ``[.., R, 128]``, and one
program owns a slab of ``S`` rows (``S * 128`` channels of one group) of one batch row. The
state is N full-vreg slabs ``[N][S, 128]`` float32, so every state update is an elementwise
op on whole vregs and ``B_t[n]``, ``C_t[n]`` enter as broadcast scalars. Time is the last
grid axis (``"arbitrary"``): each grid step walks ``chunk`` steps with a ``fori_loop`` and
leaves the state in VMEM scratch for the next.

The training forward saves the state at each chunk start (``[B, T/chunk, N, Dm]``). The
backward walks the chunks in reverse (reversed index maps): it re-runs the chunk from its
saved state, keeping the chunk's states in VMEM scratch ``[chunk + 1, N, S, 128]``, then
runs the adjoint recurrence ``g_{t-1} = exp(dt_t A) (g_t + C_t dy_t)`` backwards. dA, dD,
d delta_bias and the state adjoint accumulate in VMEM across the chunks; dB and dC are
written per slab as partial sums that XLA adds over the slabs of each group.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from seqmix.kernels.dispatch import interpret_mode

LANES = 128


@dataclasses.dataclass(frozen=True)
class Blocks:
    """``chunk``: time steps per grid step (and between saved states); ``max_rows``: the
    most 128-channel rows per program (a divisor of the rows per group that is a multiple
    of the sublane tile, 8 for 32-bit and 16 for 16-bit inputs, or all of them when none
    is)."""

    chunk: int = 32
    max_rows: int = 16


TPU_BLOCKS = Blocks()
INTERPRET_BLOCKS = Blocks(chunk=8)


@dataclasses.dataclass(frozen=True)
class _Static:
    T: int
    softplus: bool
    chunk: int
    rows: int  # S: 128-channel rows per program
    slabs: int  # programs per group
    interpret: bool


def _rows_per_program(R: int, cap: int, multiple: int) -> int:
    for S in range(min(cap, R) // multiple * multiple, 0, -multiple):
        if R % S == 0:
            return S
    return R


def _no_float64(*arrays) -> None:
    if any(a is not None and a.dtype == jnp.float64 for a in arrays):
        raise NotImplementedError(
            "the Pallas kernels compute in float32; float64 inputs need "
            "the naive or xla implementation"
        )


def _softplus(x):
    return jnp.maximum(x, 0.0) + jnp.log1p(jnp.exp(-jnp.abs(x)))


def _lane(row, n):
    """Element n of a ``[1, N]`` row, as ``[1, 1]`` (a one-hot lane reduction)."""
    lane = lax.broadcasted_iota(jnp.int32, row.shape, 1)
    return jnp.sum(jnp.where(lane == n, row, 0.0), axis=1, keepdims=True)


def _total(x):
    """Sum of a ``[S, 128]`` slab as ``[1, 1]``."""
    return jnp.sum(jnp.sum(x, axis=0, keepdims=True), axis=1, keepdims=True)


class _Refs:
    def __init__(self, refs, names):
        it = iter(refs)
        for name, present in names:
            setattr(self, name, next(it) if present else None)


def _step_inputs(r, t, t_global, st, bias):
    """(x, dt, u, B row) of step t of this chunk; dt is 0 on padded steps."""
    x = r.delta[t].astype(jnp.float32)
    if bias is not None:
        x = x + bias
    dt = _softplus(x) if st.softplus else x
    if st.T % st.chunk:
        dt = jnp.where(t_global < st.T, dt, 0.0)
    u = r.u[t].astype(jnp.float32)
    return x, dt, u, r.B[t].astype(jnp.float32)


def _fwd_kernel(*refs, st: _Static, names, N: int):
    r = _Refs(refs[:-1], names)
    h_scr = refs[-1]
    c = pl.program_id(2)

    @pl.when(c == 0)
    def _():
        if r.h0 is not None:
            h_scr[...] = r.h0[...].astype(jnp.float32)
        else:
            h_scr[...] = jnp.zeros(h_scr.shape, jnp.float32)

    if r.ckpt is not None:
        r.ckpt[...] = h_scr[...]
    A = r.A[...].astype(jnp.float32)
    bias = r.bias[...].astype(jnp.float32) if r.bias is not None else None
    Dv = r.D[...].astype(jnp.float32) if r.D is not None else None

    def step(t, h):
        _, dt, u, Brow = _step_inputs(r, t, c * st.chunk + t, st, bias)
        Crow = r.C[t].astype(jnp.float32)
        dtu = dt * u
        y = Dv * u if Dv is not None else jnp.zeros_like(u)
        new = []
        for n in range(N):
            hn = jnp.exp(dt * A[n]) * h[n] + dtu * _lane(Brow, n)
            y = y + hn * _lane(Crow, n)
            new.append(hn)
        if r.z is not None:
            zt = r.z[t].astype(jnp.float32)
            y = y * zt * jax.nn.sigmoid(zt)
        r.y[t] = y.astype(r.y.dtype)
        return tuple(new)

    h = lax.fori_loop(0, st.chunk, step, tuple(h_scr[n] for n in range(N)))
    for n in range(N):
        h_scr[n] = h[n]

    @pl.when(c == pl.num_programs(2) - 1)
    def _():
        r.hT[...] = h_scr[...]


def _bwd_kernel(*refs, st: _Static, names, N: int):
    r = _Refs(refs[:-5], names)
    hs_scr, g_scr, dA_scr, dD_scr, dbias_scr = refs[-5:]
    cc = pl.program_id(2)
    c = pl.num_programs(2) - 1 - cc  # the chunk this step works on

    @pl.when(cc == 0)
    def _():
        g_scr[...] = r.dhT[...].astype(jnp.float32)
        dA_scr[...] = jnp.zeros(dA_scr.shape, jnp.float32)
        dD_scr[...] = jnp.zeros(dD_scr.shape, jnp.float32)
        dbias_scr[...] = jnp.zeros(dbias_scr.shape, jnp.float32)

    A = r.A[...].astype(jnp.float32)
    bias = r.bias[...].astype(jnp.float32) if r.bias is not None else None
    Dv = r.D[...].astype(jnp.float32) if r.D is not None else None
    hs_scr[0] = r.ckpt[...]

    def recompute(t, h):
        _, dt, u, Brow = _step_inputs(r, t, c * st.chunk + t, st, bias)
        dtu = dt * u
        new = tuple(jnp.exp(dt * A[n]) * h[n] + dtu * _lane(Brow, n) for n in range(N))
        for n in range(N):
            hs_scr[t + 1, n] = new[n]
        return new

    lax.fori_loop(0, st.chunk, recompute, tuple(hs_scr[0, n] for n in range(N)))

    def back(tt, carry):
        g, dA, dD, dbias = carry
        t = st.chunk - 1 - tt
        x, dt, u, Brow = _step_inputs(r, t, c * st.chunk + t, st, bias)
        Crow = r.C[t].astype(jnp.float32)
        dtu = dt * u
        h_t = [hs_scr[t + 1, n] for n in range(N)]
        h_prev = [hs_scr[t, n] for n in range(N)]
        dy = r.dy[t].astype(jnp.float32)
        if r.z is not None:
            zt = r.z[t].astype(jnp.float32)
            sz = jax.nn.sigmoid(zt)
            y = Dv * u if Dv is not None else jnp.zeros_like(u)
            for n in range(N):
                y = y + h_t[n] * _lane(Crow, n)
            r.dz[t] = (dy * y * sz * (1.0 + zt * (1.0 - sz))).astype(r.dz.dtype)
            dy = dy * zt * sz
        lane = lax.broadcasted_iota(jnp.int32, Brow.shape, 1)
        dB_row = jnp.zeros(Brow.shape, jnp.float32)
        dC_row = jnp.zeros(Brow.shape, jnp.float32)
        qB = jnp.zeros_like(u)
        qAah = jnp.zeros_like(u)
        new_g, new_dA = [], []
        for n in range(N):
            b_n = _lane(Brow, n)
            a = jnp.exp(dt * A[n])
            q = g[n] + dy * _lane(Crow, n)  # dL/dh_t[n]
            dC_row = jnp.where(lane == n, _total(dy * h_t[n]), dC_row)
            dB_row = jnp.where(lane == n, _total(q * dtu), dB_row)
            qB = qB + q * b_n
            qah = q * (a * h_prev[n])
            qAah = qAah + qah * A[n]
            new_dA.append(dA[n] + qah * dt)
            new_g.append(a * q)
        r.dB[t] = dB_row
        r.dC[t] = dC_row
        ddt = qAah + u * qB
        du = dt * qB
        if Dv is not None:
            du = du + Dv * dy
            dD = dD + dy * u
        if st.softplus:
            ddt = ddt * jax.nn.sigmoid(x)
        if st.T % st.chunk:
            ddt = jnp.where(c * st.chunk + t < st.T, ddt, 0.0)
        r.du[t] = du.astype(r.du.dtype)
        r.ddelta[t] = ddt.astype(r.ddelta.dtype)
        return tuple(new_g), tuple(new_dA), dD, dbias + ddt

    init = (
        tuple(g_scr[n] for n in range(N)),
        tuple(dA_scr[n] for n in range(N)),
        dD_scr[...],
        dbias_scr[...],
    )
    g, dA, dD, dbias = lax.fori_loop(0, st.chunk, back, init)
    for n in range(N):
        g_scr[n] = g[n]
        dA_scr[n] = dA[n]
    dD_scr[...] = dD
    dbias_scr[...] = dbias

    @pl.when(cc == pl.num_programs(2) - 1)
    def _():
        r.dA[...] = dA_scr[...]
        if r.dh0 is not None:
            r.dh0[...] = g_scr[...]
        if r.dD is not None:
            r.dD[...] = dD_scr[...]
        if r.dbias is not None:
            r.dbias[...] = dbias_scr[...]


def _specs(st: _Static, N: int, reverse: bool):
    S, ns, Tc = st.rows, st.slabs, st.chunk

    def cix(c):
        return (pl.num_programs(2) - 1 - c) if reverse else c

    seq = pl.BlockSpec((None, Tc, None, S, LANES), lambda b, j, c: (b, cix(c), j // ns, j % ns, 0))
    rows = pl.BlockSpec((None, None, Tc, 1, N), lambda b, j, c: (b, j // ns, cix(c), 0, 0))
    mat = pl.BlockSpec((N, None, S, LANES), lambda b, j, c: (0, j // ns, j % ns, 0))
    vec = pl.BlockSpec((None, S, LANES), lambda b, j, c: (j // ns, j % ns, 0))
    state = pl.BlockSpec((None, N, None, S, LANES), lambda b, j, c: (b, 0, j // ns, j % ns, 0))
    ckpt = pl.BlockSpec(
        (None, None, N, None, S, LANES), lambda b, j, c: (b, cix(c), 0, j // ns, j % ns, 0)
    )
    part_rows = pl.BlockSpec((None, None, Tc, 1, N), lambda b, j, c: (b, j, cix(c), 0, 0))
    part_vec = pl.BlockSpec((None, None, S, LANES), lambda b, j, c: (b, j // ns, j % ns, 0))
    return dict(
        seq=seq,
        rows=rows,
        mat=mat,
        vec=vec,
        state=state,
        ckpt=ckpt,
        part_rows=part_rows,
        part_vec=part_vec,
    )


def _inputs(sp, u, delta, A, B, C, D, z, bias, h0):
    items = [
        ("u", u, "seq"),
        ("delta", delta, "seq"),
        ("A", A, "mat"),
        ("B", B, "rows"),
        ("C", C, "rows"),
        ("D", D, "vec"),
        ("z", z, "seq"),
        ("bias", bias, "vec"),
        ("h0", h0, "state"),
    ]
    names = [(n, x is not None) for n, x, _ in items]
    present = [(x, sp[s]) for _, x, s in items if x is not None]
    return names, [x for x, _ in present], [s for _, s in present]


def _params(st):
    interpret = pltpu.InterpretParams(detect_races=True) if st.interpret else False
    cp = pltpu.CompilerParams(
        dimension_semantics=("parallel", "parallel", "arbitrary"), vmem_limit_bytes=48 * 1024 * 1024
    )
    return dict(interpret=interpret, compiler_params=cp)


def _forward(st: _Static, u, delta, A, B, C, D, z, bias, h0, save: bool):
    Bsz, Tp, G, R, _ = u.shape
    N = A.shape[0]
    n_chunks = Tp // st.chunk
    sp = _specs(st, N, reverse=False)
    names, args, in_specs = _inputs(sp, u, delta, A, B, C, D, z, bias, h0)
    out_shape = [
        jax.ShapeDtypeStruct(u.shape, u.dtype),
        jax.ShapeDtypeStruct((Bsz, N, G, R, LANES), jnp.float32),
    ]
    out_specs = [sp["seq"], sp["state"]]
    names += [("y", True), ("hT", True), ("ckpt", save)]
    if save:
        out_shape.append(jax.ShapeDtypeStruct((Bsz, n_chunks, N, G, R, LANES), jnp.float32))
        out_specs.append(sp["ckpt"])
    outs = pl.pallas_call(
        functools.partial(_fwd_kernel, st=st, names=tuple(names), N=N),
        grid=(Bsz, G * st.slabs, n_chunks),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        scratch_shapes=[pltpu.VMEM((N, st.rows, LANES), jnp.float32)],
        name="selective_scan_fwd",
        **_params(st),
    )(*args)
    return tuple(outs) if save else (outs[0], outs[1], None)


def _backward(st: _Static, res, dy, dhT):
    u, delta, A, B, C, D, z, bias, h0, ckpt = res
    Bsz, Tp, G, R, _ = u.shape
    N = A.shape[0]
    J = G * st.slabs
    n_chunks = Tp // st.chunk
    sp = _specs(st, N, reverse=True)
    names, args, in_specs = _inputs(sp, u, delta, A, B, C, D, z, bias, None)
    names += [("ckpt", True), ("dy", True), ("dhT", True)]
    args += [ckpt, dy, dhT]
    in_specs += [sp["ckpt"], sp["seq"], sp["state"]]
    f32 = jnp.float32
    state = jax.ShapeDtypeStruct((Bsz, N, G, R, LANES), f32)
    vec = jax.ShapeDtypeStruct((Bsz, G, R, LANES), f32)
    outs = [
        ("du", jax.ShapeDtypeStruct(u.shape, u.dtype), "seq"),
        ("ddelta", jax.ShapeDtypeStruct(delta.shape, delta.dtype), "seq"),
        ("dz", jax.ShapeDtypeStruct(u.shape, z.dtype) if z is not None else None, "seq"),
        ("dB", jax.ShapeDtypeStruct((Bsz, J, Tp, 1, N), f32), "part_rows"),
        ("dC", jax.ShapeDtypeStruct((Bsz, J, Tp, 1, N), f32), "part_rows"),
        ("dA", state, "state"),
        ("dD", vec if D is not None else None, "part_vec"),
        ("dbias", vec if bias is not None else None, "part_vec"),
        ("dh0", state if h0 is not None else None, "state"),
    ]
    names += [(n, s is not None) for n, s, _ in outs]
    S = st.rows
    got = pl.pallas_call(
        functools.partial(_bwd_kernel, st=st, names=tuple(names), N=N),
        grid=(Bsz, J, n_chunks),
        in_specs=in_specs,
        out_specs=[sp[k] for _, s, k in outs if s is not None],
        out_shape=[s for _, s, _ in outs if s is not None],
        scratch_shapes=[
            pltpu.VMEM((st.chunk + 1, N, S, LANES), f32),
            pltpu.VMEM((N, S, LANES), f32),
            pltpu.VMEM((N, S, LANES), f32),
            pltpu.VMEM((S, LANES), f32),
            pltpu.VMEM((S, LANES), f32),
        ],
        name="selective_scan_bwd",
        **_params(st),
    )(*args)
    it = iter(got)
    g = {n: (next(it) if s is not None else None) for n, s, _ in outs}

    def groups(part):  # [B, J, Tp, 1, N] -> [B, G, Tp, 1, N]: the sum over a group's slabs
        return part.reshape(Bsz, G, st.slabs, Tp, 1, N).sum(2)

    def cast(x, like):
        return None if like is None else x.astype(like.dtype)

    return (
        g["du"],
        g["ddelta"],
        cast(g["dA"].sum(0), A),
        cast(groups(g["dB"]), B),
        cast(groups(g["dC"]), C),
        cast(g["dD"].sum(0) if D is not None else None, D),
        g["dz"],
        cast(g["dbias"].sum(0) if bias is not None else None, bias),
        cast(g["dh0"], h0),
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _scan(st, u, delta, A, B, C, D, z, bias, h0):
    y, hT, _ = _forward(st, u, delta, A, B, C, D, z, bias, h0, save=False)
    return y, hT


def _scan_fwd(st, u, delta, A, B, C, D, z, bias, h0):
    y, hT, ckpt = _forward(st, u, delta, A, B, C, D, z, bias, h0, save=True)
    return (y, hT), (u, delta, A, B, C, D, z, bias, h0, ckpt)


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
    """The ``pallas_tpu`` implementation (arguments as ``reference.selective_scan_naive``).

    Returns ``(y [B, T, Dm] in u's dtype, final_state [B, Dm, N] float32)``; differentiable
    in every array argument. ``blocks`` overrides the tile sizes.
    """
    _no_float64(u, delta, A, B, C, D, z, delta_bias, initial_state)
    interpret = interpret_mode()
    blocks = blocks or (INTERPRET_BLOCKS if interpret else TPU_BLOCKS)
    Bsz, T, Dm = u.shape
    N = A.shape[1]
    G = B.shape[2]
    Dg = Dm // G
    Dgp = -(-Dg // LANES) * LANES
    R = Dgp // LANES
    itemsize = min(jnp.dtype(x.dtype).itemsize for x in (u, delta, z) if x is not None)
    S = _rows_per_program(R, blocks.max_rows, 8 if itemsize >= 4 else 16)
    chunk = blocks.chunk
    Tp = -(-T // chunk) * chunk
    st = _Static(
        T=T, softplus=bool(delta_softplus), chunk=chunk, rows=S, slabs=R // S, interpret=interpret
    )

    def seq(x):  # [B, T, Dm] -> [B, Tp, G, R, 128]
        if x is None:
            return None
        x = x.reshape(Bsz, T, G, Dg)
        x = jnp.pad(x, [(0, 0), (0, Tp - T), (0, 0), (0, Dgp - Dg)])
        return x.reshape(Bsz, Tp, G, R, LANES)

    def chan(x, lead):  # [..., Dm] -> [..., G, R, 128]
        if x is None:
            return None
        x = x.reshape(*lead, G, Dg)
        x = jnp.pad(x, [(0, 0)] * (len(lead) + 1) + [(0, Dgp - Dg)])
        return x.reshape(*lead, G, R, LANES)

    def rows(x):  # [B, T, G, N] -> [B, G, Tp, 1, N]
        x = jnp.pad(x, [(0, 0), (0, Tp - T), (0, 0), (0, 0)])
        return x.transpose(0, 2, 1, 3)[:, :, :, None, :]

    A_t = chan(A.T, (N,))  # [N, G, R, 128]
    h0 = None if initial_state is None else chan(initial_state.transpose(0, 2, 1), (Bsz, N))
    y, hT = _scan(
        st, seq(u), seq(delta), A_t, rows(B), rows(C), chan(D, ()), seq(z), chan(delta_bias, ()), h0
    )
    y = y.reshape(Bsz, Tp, G, Dgp)[:, :T, :, :Dg].reshape(Bsz, T, Dm)
    hT = hT.reshape(Bsz, N, G, Dgp)[..., :Dg].reshape(Bsz, N, Dm).transpose(0, 2, 1)
    return y, hT
