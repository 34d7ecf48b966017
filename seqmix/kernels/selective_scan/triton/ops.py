"""Mamba-1's selective scan in Pallas Triton: the ``pallas_triton`` implementation of
``seqmix.kernels.selective_scan`` (padding, layouts, tiles and the custom VJP)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from seqmix.kernels.common import no_float64
from seqmix.kernels.dispatch import interpret_mode
from seqmix.kernels.selective_scan import tuning
from seqmix.kernels.selective_scan.triton import backward, forward, lanes, lanes_tiles
from seqmix.kernels.selective_scan.triton.tiles import Static, pow2_divisor


def _state_t(h):  # [B, Dm, N] <-> [B, N, Dm]
    return None if h is None else jnp.swapaxes(h, 1, 2)


def _time_minor(x):  # [B, Tp, G, N] -> [B, G, N, Tp]
    return jnp.transpose(x, (0, 2, 3, 1))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _scan(st, lanes_st, u, delta, A, B, C, D, z, bias, h0):
    """``(y [B, Tp, Dm], final state [B, Dm, N] float32)`` on padded arguments (T a multiple
    of the chunk, N a power of 2); ``st`` a ``tiles.Static``. The primal-only call runs the
    chunked forward; the training path (``_scan_fwd``, ``_scan_bwd``) the chunked kernels
    when ``lanes_st`` is None, else the lanes kernels (``lanes.scan_fwd``, ``lanes.scan_bwd``
    on their own residuals), ``lanes_st`` a ``lanes_tiles.Static`` of the same padded
    length."""
    y, hT, _ = forward.forward(
        st, u, delta, A.T, _time_minor(B), _time_minor(C), D, z, bias, _state_t(h0), save=False
    )
    return y, _state_t(hT)


def _scan_fwd(st, lanes_st, u, delta, A, B, C, D, z, bias, h0):
    if lanes_st is not None:
        return lanes.scan_fwd(lanes_st, u, delta, A, B, C, D, z, bias, h0)
    Bt, Ct = _time_minor(B), _time_minor(C)
    y, hT, ckpt = forward.forward(st, u, delta, A.T, Bt, Ct, D, z, bias, _state_t(h0), save=True)
    return (y, _state_t(hT)), (u, delta, A, Bt, Ct, D, z, bias, h0, ckpt)


def _scan_bwd(st, lanes_st, res, cts):
    if lanes_st is not None:
        return lanes.scan_bwd(lanes_st, res, cts)
    u, delta, A, Bt, Ct, D, z, bias, h0, ckpt = res
    dy, dhT = cts
    g, nJ = backward.backward(
        st, u, delta, A.T, Bt, Ct, D, z, bias, ckpt, dy, _state_t(dhT.astype(jnp.float32))
    )
    Bsz, G, N, Tp = Bt.shape

    def groups(part):  # [B, nJ, N, Tp] -> [B, Tp, G, N]
        return part.reshape(Bsz, G, nJ // G, N, Tp).sum(2).transpose(0, 3, 1, 2)

    def total(x, like):
        return None if like is None else x.sum(0).astype(like.dtype)

    return (
        g["du"],
        g["ddelta"],
        g["dA"].sum(0).T.astype(A.dtype),
        groups(g["dB"]).astype(Bt.dtype),
        groups(g["dC"]).astype(Ct.dtype),
        total(g["dD"], D),
        g["dz"],
        total(g["dbias"], bias),
        None if h0 is None else _state_t(g["dh0"]).astype(h0.dtype),
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
    config: tuning.TritonConfig | None = None,
):
    """The ``pallas_triton`` implementation (arguments as ``reference.selective_scan_naive``).

    Returns ``(y [B, T, Dm] in u's dtype, final_state [B, Dm, N] float32)``; differentiable
    in every array argument. ``config``: ``tuning.TritonConfig`` (None: the table's); its
    ``algorithm`` picks the kernels of the training path.
    """
    no_float64(u, delta, A, B, C, D, z, delta_bias, initial_state)
    interpret = interpret_mode()
    blocks = tuning.triton_config(config, interpret=interpret)
    for name in ("block_d", "chunk"):
        v = getattr(blocks, name)
        if not isinstance(v, int) or v < 1 or v & (v - 1):
            raise ValueError(f"TritonConfig.{name} must be a power of 2, got {v!r}")
    algorithm = "chunked" if blocks.algorithm is None else blocks.algorithm
    if algorithm not in tuning.TRITON_ALGORITHMS:
        raise ValueError(
            f"TritonConfig.algorithm must be one of {tuning.TRITON_ALGORITHMS} (None: "
            f"'chunked'), got {blocks.algorithm!r}"
        )
    Bsz, T, Dm = u.shape
    N = A.shape[1]
    G = B.shape[2]
    Dg = Dm // G
    bd = pow2_divisor(Dg, blocks.block_d)
    K = blocks.chunk
    Tp = -(-T // K) * K
    lanes_st = None
    if algorithm == "lanes":  # one padded length for both kernels
        lanes_st, Tp = lanes_tiles.plan(
            lanes_tiles.INTERPRET_TILES if interpret else lanes_tiles.GPU_TILES,
            Bsz=Bsz,
            T=T,
            Dm=Dm,
            G=G,
            softplus=bool(delta_softplus),
            interpret=interpret,
            multiple=K,
        )
    st = Static(
        T=T,
        padded=Tp != T,
        chunk=K,
        block_d=bd,
        group_blocks=Dg // bd,
        softplus=bool(delta_softplus),
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

    y, hT = _scan(
        st,
        lanes_st,
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
