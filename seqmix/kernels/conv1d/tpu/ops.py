"""The short causal convolution on a TPU: the ``pallas_tpu`` implementation of
``seqmix.kernels.causal_conv1d`` (padding, tiles and the custom VJP)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from seqmix.kernels.common import no_float64
from seqmix.kernels.conv1d import reference, tuning
from seqmix.kernels.conv1d.tpu import backward, forward
from seqmix.kernels.conv1d.tpu.tiles import HALO, LANES, MAX_WIDTH, Static
from seqmix.kernels.dispatch import interpret_mode


def check_width(W: int) -> None:
    if not 2 <= W <= MAX_WIDTH:
        raise NotImplementedError(
            f"causal_conv1d pallas kernels support widths 2 to {MAX_WIDTH}, got weight of width {W}"
        )


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _conv(st, x, weight, bias, hist):
    return forward.forward(st, x, weight, bias, hist)


def _conv_fwd(st, x, weight, bias, hist):
    return forward.forward(st, x, weight, bias, hist), (x, weight, bias, hist)


def _conv_bwd(st, res, dy):
    return backward.backward(st, *res, dy)


_conv.defvjp(_conv_fwd, _conv_bwd)


def causal_conv1d(
    x,
    weight,
    bias=None,
    *,
    activation=None,
    initial_state=None,
    config: tuning.TpuConfig | None = None,
):
    """The ``pallas_tpu`` implementation (arguments as ``reference.causal_conv1d_naive``).

    Returns ``(y [B, T, C] in x's dtype, final_state [B, W - 1, C] in x's dtype)``;
    differentiable in x, weight, bias and initial_state. ``config``: ``tuning.TpuConfig``
    (None: the table's).
    """
    no_float64(x, weight, bias, initial_state)
    W = weight.shape[0]
    check_width(W)
    blocks = tuning.tpu_config(config, "causal_conv1d", interpret=interpret_mode())
    if blocks.block_t % HALO or blocks.block_c % LANES:
        raise ValueError(
            f"TpuConfig.block_t must be a multiple of {HALO} and TpuConfig.block_c of "
            f"{LANES}, got {blocks}"
        )
    _B, T, C = x.shape
    Tc = min(blocks.block_t, -(-T // HALO) * HALO)
    Cp = -(-C // LANES) * LANES
    bc = max(d for d in range(LANES, min(blocks.block_c, Cp) + 1, LANES) if Cp % d == 0)
    Tp = -(-T // Tc) * Tc
    st = Static(W=W, silu=activation == "silu", block_t=Tc, block_c=bc, interpret=interpret_mode())
    xp = jnp.pad(x, [(0, 0), (0, Tp - T), (0, Cp - C)])
    hist = None
    if initial_state is not None:
        hist = jnp.pad(initial_state, [(0, 0), (HALO - (W - 1), 0), (0, Cp - C)])
    wp = jnp.pad(weight, [(0, 0), (0, Cp - C)])
    bp = None if bias is None else jnp.pad(bias, [(0, Cp - C)])[None]
    y = _conv(st, xp, wp, bp, hist)[:, :T, :C]
    return y, reference.final_state(x, initial_state, W)
