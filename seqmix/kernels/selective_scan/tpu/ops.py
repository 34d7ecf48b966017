"""Mamba-1's selective scan on a TPU: the ``pallas_tpu`` implementation of
``seqmix.kernels.selective_scan`` (the padded layout of the arguments and the custom VJP)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from seqmix.kernels.common import no_float64, round_up
from seqmix.kernels.dispatch import interpret_mode
from seqmix.kernels.selective_scan import tuning
from seqmix.kernels.selective_scan.tpu import backward, forward
from seqmix.kernels.selective_scan.tpu.tiles import Static

LANES = 128


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _scan(st, u, delta, A, B, C, D, z, bias, h0):
    y, hT, _ = forward.forward(st, u, delta, A, B, C, D, z, bias, h0, save=False)
    return y, hT


def _scan_fwd(st, u, delta, A, B, C, D, z, bias, h0):
    y, hT, ckpt = forward.forward(st, u, delta, A, B, C, D, z, bias, h0, save=True)
    return (y, hT), (u, delta, A, B, C, D, z, bias, h0, ckpt)


def _scan_bwd(st, res, cts):
    u, delta, A, B, C, D, z, bias, h0, ckpt = res
    dy, dhT = cts
    g = backward.backward(st, u, delta, A, B, C, D, z, bias, ckpt, dy, dhT.astype(jnp.float32))
    Bsz, Tp, G, N = B.shape

    def groups(part):  # [B, nJ, Tp, N] -> [B, Tp, G, N]
        return part.reshape(Bsz, G, st.group_blocks, Tp, N).sum(2).transpose(0, 2, 1, 3)

    def total(x, like):
        return None if like is None else x.sum(0).astype(like.dtype)

    return (
        g["du"],
        g["ddelta"],
        g["dA"].sum(0).astype(A.dtype),
        groups(g["dB"]).astype(B.dtype),
        groups(g["dC"]).astype(C.dtype),
        total(g["dD"], D),
        g["dz"],
        total(g["dbias"], bias),
        None if h0 is None else g["dh0"].astype(h0.dtype),
    )


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
    config: tuning.TpuConfig | None = None,
):
    """The ``pallas_tpu`` implementation (arguments as ``reference.selective_scan_naive``).

    Returns ``(y [B, T, Dm] in u's dtype, final_state [B, Dm, N] float32)``; differentiable
    in every array argument. ``config``: ``tuning.TpuConfig`` (None: the table's).
    """
    no_float64(u, delta, A, B, C, D, z, delta_bias, initial_state)
    interpret = interpret_mode()
    blocks = tuning.tpu_config(config, interpret=interpret)
    itemsize = min(jnp.dtype(x.dtype).itemsize for x in (u, delta, z) if x is not None)
    # the sublane tile of the inputs' blocks (the interpreter has none past 8)
    sublanes = 8 if itemsize >= 4 or interpret else 16
    if not isinstance(blocks.chunk, int) or blocks.chunk < 1 or blocks.chunk % sublanes:
        raise ValueError(
            f"TpuConfig.chunk must be a positive multiple of {sublanes} for "
            f"{itemsize}-byte inputs, got {blocks.chunk!r}"
        )
    if not isinstance(blocks.block_c, int) or blocks.block_c < 1 or blocks.block_c % LANES:
        raise ValueError(
            f"TpuConfig.block_c must be a positive multiple of {LANES}, got {blocks.block_c!r}"
        )
    _, T, Dm = u.shape
    G = B.shape[2]
    Dg = Dm // G
    L = min(blocks.block_c, round_up(Dg, LANES))
    Dgp = round_up(Dg, L)
    K = blocks.chunk
    Tp = round_up(T, K)
    st = Static(
        T=T,
        softplus=bool(delta_softplus),
        chunk=K,
        block_c=L,
        group_blocks=Dgp // L,
        interpret=interpret,
    )

    def chan(x):  # [..., Dm] -> [..., G * Dgp]
        if x is None:
            return None
        lead = x.shape[:-1]
        x = x.reshape(*lead, G, Dg)
        x = jnp.pad(x, [(0, 0)] * (len(lead) + 1) + [(0, Dgp - Dg)])
        return x.reshape(*lead, G * Dgp)

    def seq(x):  # [B, T, Dm] -> [B, Tp, G * Dgp]
        if x is None:
            return None
        return chan(jnp.pad(x, [(0, 0), (0, Tp - T), (0, 0)]))

    def unchan(x):  # [..., G * Dgp] -> [..., Dm]
        lead = x.shape[:-1]
        return x.reshape(*lead, G, Dgp)[..., :Dg].reshape(*lead, Dm)

    pad_t = [(0, 0), (0, Tp - T), (0, 0), (0, 0)]
    h0 = None if initial_state is None else chan(jnp.swapaxes(initial_state, 1, 2))
    vec = [None if x is None else chan(x)[None, :] for x in (D, delta_bias)]
    y, hT = _scan(
        st,
        seq(u),
        seq(delta),
        chan(A.T),
        jnp.pad(B, pad_t),
        jnp.pad(C, pad_t),
        vec[0],
        seq(z),
        vec[1],
        h0,
    )
    return unchan(y[:, :T]), jnp.swapaxes(unchan(hT), 1, 2)
