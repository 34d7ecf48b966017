"""The backward kernel of the chunked selective scan on a TPU.

Chunks in reverse (reversed index maps); per grid step, from the chunk's saved start state:
per state n the chunk's states are recomputed by the forward's in-register scan, ``h_{t-1}``
is that scan moved one row down (row 0 the start state); the adjoint is the reverse scan of
the maps ``r -> a_t (c_t + r)`` with ``c_t = C_{t,n} dpre_t``, giving ``r_t = a_t q_t``;
``g_t = r_{t+1}`` (the adjoint from later steps: the scan moved one row up, the last row
the adjoint carried in from the next chunk) and ``q_t = g_t + c_t = dL/dh_t``. Then, with
``a_t h_{t-1}`` formed as in the forward: ``dA_n += sum_t q a h_{t-1} dt``,
``d dt = sum_n q a h_{t-1} A_n + u sum_n q B_n``, ``du = dt sum_n q B_n + D dpre``,
``dB_{t,n} = sum_c q dt u``, ``dC_{t,n} = sum_c dpre h``. dA, dD, d delta_bias and the state
adjoint stay resident in their output blocks across the chunks; dB and dC are written per
channel block as partial sums that XLA adds over each group's blocks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from seqmix.kernels.selective_scan.tpu.forward import operands
from seqmix.kernels.selective_scan.tpu.tiles import (
    Refs,
    Static,
    affine_scan,
    call,
    chunk_dt,
    column,
    into_column,
    shift_rows,
    specs,
)


def _bwd_kernel(*refs, st: Static, names):
    r = Refs(refs[:-1], names)
    g_scr = refs[-1]  # [N, 1, block_c]: dL/dh at the end of this chunk, from later chunks
    N = g_scr.shape[0]
    K = st.chunk
    c = pl.program_id(2)
    chunk = pl.num_programs(2) - 1 - c

    @pl.when(c == 0)
    def _():
        g_scr[...] = r.dhT[...].astype(jnp.float32)[:, None, :]
        r.dA[...] = jnp.zeros(r.dA.shape, jnp.float32)
        for ref in (r.dD, r.dbias):
            if ref is not None:
                ref[...] = jnp.zeros(ref.shape, jnp.float32)

    A = r.A[...].astype(jnp.float32)
    bias = r.bias[...].astype(jnp.float32) if r.bias is not None else None
    x, dt = chunk_dt(r, st, bias, chunk)
    u = r.u[...].astype(jnp.float32)
    dy = r.dy[...].astype(jnp.float32)
    Bk = r.B[...].astype(jnp.float32)
    Ck = r.C[...].astype(jnp.float32)
    h_in = r.ckpt[...]  # [N, block_c]
    dtu = dt * u
    decays, prevs, states = [], [], []
    pre = r.D[...].astype(jnp.float32) * u if r.D is not None else jnp.zeros_like(u)
    for n in range(N):
        a = jnp.exp(dt * A[n : n + 1])
        b = dtu * column(Bk, n)
        prod_a, h_local = affine_scan(a, b)
        h = prod_a * h_in[n : n + 1] + h_local
        decays.append(a)
        prevs.append(shift_rows(h, h_in[n : n + 1]))
        states.append(h)
        pre = pre + h * column(Ck, n)
    if r.z is not None:
        zr = r.z[...].astype(jnp.float32)
        sz = jax.nn.sigmoid(zr)
        dpre = dy * zr * sz
        r.dz[...] = (dy * pre * sz * (1.0 + zr * (1.0 - sz))).astype(r.dz.dtype)
    else:
        dpre = dy
    dB = jnp.zeros(Bk.shape, jnp.float32)
    dC = jnp.zeros(Ck.shape, jnp.float32)
    qB = jnp.zeros_like(u)
    ddt = jnp.zeros_like(u)
    for n in range(N):
        a, h_prev, h = decays[n], prevs[n], states[n]
        cn = dpre * column(Ck, n)
        prod_a, r_local = affine_scan(a, a * cn, reverse=True)
        r_all = prod_a * g_scr[n] + r_local  # a_t q_t
        q = shift_rows(r_all, g_scr[n], reverse=True) + cn
        dC = into_column(dC, jnp.sum(dpre * h, axis=1, keepdims=True), n)
        dB = into_column(dB, jnp.sum(q * dtu, axis=1, keepdims=True), n)
        qB = qB + q * column(Bk, n)
        qah = q * (a * h_prev)
        r.dA[n : n + 1, :] += jnp.sum(qah * dt, axis=0, keepdims=True)
        ddt = ddt + qah * A[n : n + 1]
        g_scr[n] = r_all[0:1]
    r.dB[...] = dB
    r.dC[...] = dC
    ddt = ddt + u * qB
    du = dt * qB
    if r.D is not None:
        du = du + r.D[...].astype(jnp.float32) * dpre
        r.dD[...] += jnp.sum(dpre * u, axis=0, keepdims=True)
    if st.softplus:
        ddt = ddt * jax.nn.sigmoid(x)
    if st.T % K:
        t = chunk * K + jax.lax.broadcasted_iota(jnp.int32, ddt.shape, 0)
        ddt = jnp.where(t < st.T, ddt, 0.0)
    if r.dbias is not None:
        r.dbias[...] += jnp.sum(ddt, axis=0, keepdims=True)
    r.du[...] = du.astype(r.du.dtype)
    r.ddelta[...] = ddt.astype(r.ddelta.dtype)

    @pl.when(c == pl.num_programs(2) - 1)
    def _():
        r.dh0[...] = g_scr[:, 0, :]


def backward(st: Static, u, delta, A, B, C, D, z, bias, ckpt, dy, dhT):
    """Gradient pieces on the padded layout (``forward.forward``'s): a dict with du, ddelta,
    dz ``[B, Tp, Cp]``, dB / dC partials ``[B, Cp / block_c, Tp, N]``, dA and dh0
    ``[B, N, Cp]``, dD and dbias ``[B, 1, Cp]`` (None where absent)."""
    Bsz, Tp, Cp = u.shape
    N = A.shape[0]
    nJ = Cp // st.block_c
    sp = specs(st, N, reverse=True)
    f32 = jnp.float32
    SD = jax.ShapeDtypeStruct
    ins = operands(sp, u, delta, A, B, C, D, z, bias) + [
        ("ckpt", ckpt, sp["ckpt"]),
        ("dy", dy, sp["seq"]),
        ("dhT", dhT, sp["state"]),
    ]
    outs = [
        ("du", SD(u.shape, u.dtype), sp["seq"]),
        ("ddelta", SD(u.shape, delta.dtype), sp["seq"]),
        ("dz", SD(u.shape, z.dtype) if z is not None else None, sp["seq"]),
        ("dB", SD((Bsz, nJ, Tp, N), f32), sp["part"]),
        ("dC", SD((Bsz, nJ, Tp, N), f32), sp["part"]),
        ("dA", SD((Bsz, N, Cp), f32), sp["state"]),
        ("dh0", SD((Bsz, N, Cp), f32), sp["state"]),
        ("dD", SD((Bsz, 1, Cp), f32) if D is not None else None, sp["row_vec"]),
        ("dbias", SD((Bsz, 1, Cp), f32) if bias is not None else None, sp["row_vec"]),
    ]
    return call(
        _bwd_kernel,
        "selective_scan_bwd",
        st,
        (Bsz, nJ, Tp // st.chunk),
        ins,
        outs,
        [pltpu.VMEM((N, 1, st.block_c), jnp.float32)],
    )
