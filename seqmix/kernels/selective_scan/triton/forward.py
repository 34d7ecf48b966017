"""The forward kernel of the chunked selective scan in Pallas Triton.

Per chunk of K steps: the pairs ``(a_t, b_t) = (exp(dt_t A), dt_t u_t B_t)`` as
``[N, K, block_d]`` tiles, their inclusive scan along time by the composition of affine
maps (``associative.affine``: ``(a1, b1) then (a2, b2) = (a2 a1, a2 b1 + b2)``), giving
the chunk-local ``(prod a, h from zero)``; the carried state ``h_in`` enters as
``h_t = (prod_{s<=t} a_s) h_in + h_t^local``; ``y_t = C_t . h_t + D u_t`` (times
``silu(z_t)``) for the whole chunk at once; the chunk's last state is carried on. Decay to
zero inside a chunk is exact: the products underflow to 0, nothing is divided or
subtracted. The forward for training writes the state at each chunk start
(``[B, T/K, N, Dm]`` float32) for the backward.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from seqmix.kernels.selective_scan.triton.associative import affine, associative_scan
from seqmix.kernels.selective_scan.triton.tiles import Call, Chunk, Refs, at_step


def _fwd_kernel(*refs, st, names):
    r = Refs(refs, names)
    ck = Chunk(r, st)
    h = r.h0[...].astype(jnp.float32) if r.h0 is not None else jnp.zeros_like(ck.A)

    def chunk_body(k, h):
        base = ck.start(k)
        if r.ckpt is not None:
            r.ckpt[k] = h
        _, dt = ck.dt(base)
        u = ck.rows(r.u, base)
        a, b = ck.pairs(dt, u, ck.cols(r.B, base))
        prod_a, h_local = associative_scan(affine, (a, b), axis=1)
        hs = prod_a * h[:, None, :] + h_local  # [N, K, bd]
        y = jnp.sum(hs * ck.cols(r.C, base)[:, :, None], axis=0)  # [K, bd]
        if ck.D is not None:
            y = y + ck.D[None, :] * u
        if r.z is not None:
            y = y * jax.nn.silu(ck.rows(r.z, base))
        r.y[pl.ds(base, st.chunk), :] = y.astype(r.y.dtype)
        return at_step(hs, st.chunk - 1)

    h = lax.fori_loop(0, ck.n_chunks, chunk_body, h)
    r.hT[...] = h


def forward(st, u, delta, AT, B, C, D, z, bias, h0t, save: bool):
    """``(y, final state [B, N, Dm], chunk-start states or None)`` on transposed A
    (``[N, Dm]``), B / C (``[B, G, N, Tp]``) and states (``[B, N, Dm]``)."""
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
        ("h0", h0t, "state"),
    ]
    outs = [
        ("y", call.shape("seq", u.dtype), "seq"),
        ("hT", call.shape("state"), "state"),
        ("ckpt", call.shape("ckpt") if save else None, "ckpt"),
    ]
    got = call(_fwd_kernel, "selective_scan_chunked_fwd", ins, outs, st.num_warps)
    return got["y"], got["hT"], got["ckpt"]
