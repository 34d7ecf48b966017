"""The short causal convolution in Pallas Triton: the ``pallas_triton`` implementation of
``seqmix.kernels.causal_conv1d`` (tiles and the custom VJP)."""

from __future__ import annotations

import functools

import jax
from jax.experimental import pallas as pl

from seqmix.kernels.common import no_float64
from seqmix.kernels.conv1d import reference, tuning
from seqmix.kernels.conv1d.triton import backward, forward
from seqmix.kernels.conv1d.triton.tiles import Static
from seqmix.kernels.dispatch import interpret_mode

MAX_WIDTH = 8


def check_width(W: int) -> None:
    if not 2 <= W <= MAX_WIDTH:
        raise NotImplementedError(
            f"causal_conv1d pallas kernels support widths 2 to {MAX_WIDTH}, got weight of width {W}"
        )


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _conv(st, x, weight, bias, h0):
    return forward.forward(st, x, weight, bias, h0)


def _conv_fwd(st, x, weight, bias, h0):
    return forward.forward(st, x, weight, bias, h0), (x, weight, bias, h0)


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
    config: tuning.TritonConfig | None = None,
):
    """The ``pallas_triton`` implementation (arguments as ``reference.causal_conv1d_naive``).

    Returns ``(y [B, T, C] in x's dtype, final_state [B, W - 1, C] in x's dtype)``;
    differentiable in x, weight, bias and initial_state. ``config``: ``tuning.TritonConfig``
    (None: the table's).
    """
    no_float64(x, weight, bias, initial_state)
    W = weight.shape[0]
    check_width(W)
    blocks = tuning.triton_config(config, "causal_conv1d", interpret=interpret_mode())
    _B, T, _C = x.shape
    st = Static(
        T=T,
        W=W,
        silu=activation == "silu",
        block_c=blocks.block_c,
        block_t=min(blocks.block_t, pl.next_power_of_2(T)),
        bwd_block_t=min(blocks.bwd_block_t, max(8, pl.next_power_of_2(T))),
        num_warps=blocks.num_warps,
        interpret=interpret_mode(),
    )
    y = _conv(st, x, weight, bias, initial_state)
    return y, reference.final_state(x, initial_state, W)
