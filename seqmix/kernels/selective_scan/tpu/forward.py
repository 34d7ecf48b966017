"""The forward kernel of the chunked selective scan on a TPU.

Per grid step (a chunk of K steps) and state n: ``(a, b) = (exp(dt A_n), dt u B_n)`` as
``[K, block_c]`` tiles, their in-register scan along sublanes (``tiles.affine_scan``), the
carried state entering as ``h = (prod a) h_in + h_local``; ``y = sum_n C_n h_n + D u``
(times ``silu(z)``) for the whole chunk; row K - 1 of ``h_n`` goes to the scratch state for
the next grid step. The training forward saves the state at each chunk start
(``[B, T/K, N, channels]`` float32).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from seqmix.kernels.selective_scan.tpu.tiles import (
    Refs,
    Static,
    affine_scan,
    call,
    chunk_dt,
    column,
    specs,
)


def _fwd_kernel(*refs, st: Static, names):
    r = Refs(refs[:-1], names)
    h_scr = refs[-1]  # [N, 1, block_c]
    N = h_scr.shape[0]
    c = pl.program_id(2)

    @pl.when(c == 0)
    def _():
        if r.h0 is not None:
            h_scr[...] = r.h0[...].astype(jnp.float32)[:, None, :]
        else:
            h_scr[...] = jnp.zeros(h_scr.shape, jnp.float32)

    if r.ckpt is not None:
        r.ckpt[...] = h_scr[:, 0, :]
    A = r.A[...].astype(jnp.float32)
    bias = r.bias[...].astype(jnp.float32) if r.bias is not None else None
    _, dt = chunk_dt(r, st, bias, c)
    u = r.u[...].astype(jnp.float32)
    Bk = r.B[...].astype(jnp.float32)
    Ck = r.C[...].astype(jnp.float32)
    dtu = dt * u
    y = r.D[...].astype(jnp.float32) * u if r.D is not None else jnp.zeros_like(u)
    for n in range(N):
        prod_a, h_local = affine_scan(jnp.exp(dt * A[n : n + 1]), dtu * column(Bk, n))
        h = prod_a * h_scr[n] + h_local
        y = y + h * column(Ck, n)
        h_scr[n] = h[st.chunk - 1 :]
    if r.z is not None:
        y = y * jax.nn.silu(r.z[...].astype(jnp.float32))
    r.y[...] = y.astype(r.y.dtype)

    @pl.when(c == pl.num_programs(2) - 1)
    def _():
        r.hT[...] = h_scr[:, 0, :]


def operands(sp, u, delta, A, B, C, D, z, bias):
    return [
        ("u", u, sp["seq"]),
        ("delta", delta, sp["seq"]),
        ("A", A, sp["mat"]),
        ("B", B, sp["rows"]),
        ("C", C, sp["rows"]),
        ("D", D, sp["vec"]),
        ("z", z, sp["seq"]),
        ("bias", bias, sp["vec"]),
    ]


def forward(st: Static, u, delta, A, B, C, D, z, bias, h0, save: bool):
    """On the padded layout (``ops.py``): u / delta / z ``[B, Tp, Cp]``, A ``[N, Cp]``, B / C
    ``[B, Tp, G, N]``, D / bias ``[1, Cp]``, h0 ``[B, N, Cp]``. Returns (y, final state
    ``[B, N, Cp]``, chunk-start states or None)."""
    Bsz, Tp, Cp = u.shape
    N = A.shape[0]
    nk = Tp // st.chunk
    sp = specs(st, N, reverse=False)
    ins = operands(sp, u, delta, A, B, C, D, z, bias) + [("h0", h0, sp["state"])]
    outs = [
        ("y", jax.ShapeDtypeStruct(u.shape, u.dtype), sp["seq"]),
        ("hT", jax.ShapeDtypeStruct((Bsz, N, Cp), jnp.float32), sp["state"]),
        (
            "ckpt",
            jax.ShapeDtypeStruct((Bsz, nk, N, Cp), jnp.float32) if save else None,
            sp["ckpt"],
        ),
    ]
    got = call(
        _fwd_kernel,
        "selective_scan_fwd",
        st,
        (Bsz, Cp // st.block_c, nk),
        ins,
        outs,
        [pltpu.VMEM((N, 1, st.block_c), jnp.float32)],
    )
    return got["y"], got["hT"], got["ckpt"]
