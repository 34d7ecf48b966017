"""The backward kernel of the chunked selective scan in Pallas Triton.

Chunks in reverse; per chunk, from its saved start state ``h_in``:

* the forward states are recomputed, not stored: the inclusive scan by
  ``associative.affine_exclusive`` of the leaves ``(a_t, 1, b_t, 0)`` gives the state
  before each step, ``h_{t-1} = P'_t h_in + E_t``, and ``h_t = a_t h_{t-1} + b_t``;
* the adjoint runs as a reverse scan of the same combine over ``(a_t, 1, a_t c_t, 0)``
  with ``c_t = C_t dpre_t`` (``dpre = dL/d(C.h + D u)``): the maps ``r -> a_t (c_t + r)``
  composed from the chunk's end give ``g_t = dL/dh_t`` from the later steps,
  ``g_t = P'_t g_in + E_t``, where ``g_in`` comes from the next chunk; ``q_t = g_t + c_t``
  is the whole ``dL/dh_t`` and ``a_base q_base`` goes on to the previous chunk;
* with ``a_t h_{t-1}`` formed as in the forward (no division): ``dA += q a h_{t-1} dt``,
  ``d dt = sum_n q a h_{t-1} A + u (q . B)``, ``du = dt (q . B) + D dpre``,
  ``dB_t = sum_d q dt u``, ``dC_t = sum_d dpre h_t``.

dB and dC are per-program partial sums (``[B, Dm / block_d, N, T]``) that XLA adds over
each group's channel blocks; dA, dD, d delta_bias per batch row, summed in XLA
(deterministic, no atomics).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from seqmix.kernels.selective_scan.triton.associative import affine_exclusive, associative_scan
from seqmix.kernels.selective_scan.triton.tiles import Call, Chunk, Refs, at_step


def _exclusive(a, b, *, reverse: bool):
    """The exclusive scan of the affine pairs (the map of the steps strictly before each
    step, in scan order) as ``(P', E)``."""
    _, p, _, e = associative_scan(
        affine_exclusive, (a, jnp.ones_like(a), b, jnp.zeros_like(b)), axis=1, reverse=reverse
    )
    return p, e


def _bwd_kernel(*refs, st, names):
    r = Refs(refs, names)
    ck = Chunk(r, st)
    K = st.chunk

    def chunk_body(kk, carry):
        g, dA, dD, dbias = carry
        k = ck.n_chunks - 1 - kk
        base = ck.start(k)
        x, dt = ck.dt(base)
        u = ck.rows(r.u, base)
        dy = ck.rows(r.dy, base)
        Bk, Ck = ck.cols(r.B, base), ck.cols(r.C, base)
        a, b = ck.pairs(dt, u, Bk)
        p, e = _exclusive(a, b, reverse=False)
        h_prev = p * r.ckpt[k][:, None, :] + e  # h_{t-1}, [N, K, bd]
        hs = a * h_prev + b
        if r.z is not None:
            zr = ck.rows(r.z, base)
            sz = jax.nn.sigmoid(zr)
            dpre = dy * zr * sz
            pre = jnp.sum(hs * Ck[:, :, None], axis=0)
            if ck.D is not None:
                pre = pre + ck.D[None, :] * u
            dz = dy * pre * sz * (1.0 + zr * (1.0 - sz))
            r.dz[pl.ds(base, K), :] = dz.astype(r.dz.dtype)
        else:
            dpre = dy
        c = dpre[None, :, :] * Ck[:, :, None]  # dL/dh_t through y_t
        p, e = _exclusive(a, a * c, reverse=True)
        q = p * g[:, None, :] + e + c  # dL/dh_t
        dtu = dt * u
        r.dC[:, pl.ds(base, K)] = jnp.sum(dpre[None, :, :] * hs, axis=2)
        r.dB[:, pl.ds(base, K)] = jnp.sum(q * dtu[None, :, :], axis=2)
        qB = jnp.sum(q * Bk[:, :, None], axis=0)  # [K, bd]
        qah = q * (a * h_prev)  # dL/da_t * a_t
        dA = dA + jnp.sum(qah * dt[None, :, :], axis=1)
        ddt = jnp.sum(qah * ck.A[:, None, :], axis=0) + u * qB
        du = dt * qB
        if ck.D is not None:
            du = du + ck.D[None, :] * dpre
            dD = dD + jnp.sum(dpre * u, axis=0)
        if st.softplus:
            ddt = ddt * jax.nn.sigmoid(x)
        if st.padded:
            t = base + lax.broadcasted_iota(jnp.int32, ddt.shape, 0)
            ddt = jnp.where(t < st.T, ddt, 0.0)
        r.du[pl.ds(base, K), :] = du.astype(r.du.dtype)
        r.ddelta[pl.ds(base, K), :] = ddt.astype(r.ddelta.dtype)
        return at_step(a * q, 0), dA, dD, dbias + jnp.sum(ddt, axis=0)

    zeros_d = jnp.zeros(ck.A.shape[1:], jnp.float32)
    init = (r.dhT[...].astype(jnp.float32), jnp.zeros_like(ck.A), zeros_d, zeros_d)
    g, dA, dD, dbias = lax.fori_loop(0, ck.n_chunks, chunk_body, init)
    r.dA[...] = dA
    r.dh0[...] = g
    if r.dD is not None:
        r.dD[...] = dD
    if r.dbias is not None:
        r.dbias[...] = dbias


def backward(st, u, delta, AT, B, C, D, z, bias, ckpt, dy, dhTt):
    """The gradient pieces (see the module docstring) as a dict, and the channel blocks."""
    Bsz, Tp, Dm = u.shape
    N = AT.shape[0]
    call = Call(st, Bsz, Tp, Dm, N)
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
        ("dhT", dhTt, "state"),
    ]
    outs = [
        ("du", call.shape("seq", u.dtype), "seq"),
        ("ddelta", call.shape("seq", delta.dtype), "seq"),
        ("dz", call.shape("seq", z.dtype) if z is not None else None, "seq"),
        ("dB", call.shape("part"), "part"),
        ("dC", call.shape("part"), "part"),
        ("dA", call.shape("state"), "state"),
        ("dh0", call.shape("state"), "state"),
        ("dD", call.shape("row_vec") if D is not None else None, "row_vec"),
        ("dbias", call.shape("row_vec") if bias is not None else None, "row_vec"),
    ]
    return call(_bwd_kernel, "selective_scan_chunked_bwd", ins, outs, st.bwd_num_warps), call.nJ
