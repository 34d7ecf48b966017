"""One decoding token of the causal convolution as a Pallas Mosaic TPU kernel."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from seqmix.kernels import common
from seqmix.kernels.common import no_float64
from seqmix.kernels.conv1d import tuning
from seqmix.kernels.conv1d.tpu.ops import check_width
from seqmix.kernels.conv1d.tpu.tiles import LANES
from seqmix.kernels.dispatch import interpret_mode


def _step_kernel(x_ref, s_ref, w_ref, bias_ref, y_ref, ns_ref, *, W, silu):
    xt = x_ref[...]
    rows = [s_ref[pl.ds(k, 1), :] for k in range(W - 1)] + [xt]
    pre = None
    for j in range(W):
        term = w_ref[pl.ds(j, 1), :].astype(jnp.float32) * rows[j].astype(jnp.float32)
        pre = term if pre is None else pre + term
    if bias_ref is not None:
        pre = pre + bias_ref[...].astype(jnp.float32)
    y = pre * jax.nn.sigmoid(pre) if silu else pre
    y_ref[...] = y.astype(y_ref.dtype)
    for k in range(W - 1):
        ns_ref[pl.ds(k, 1), :] = rows[k + 1].astype(ns_ref.dtype)


def causal_conv1d_step(
    x,
    state,
    weight,
    bias=None,
    *,
    activation=None,
    config: tuning.TpuConfig | None = None,
):
    """One decoding token (``pallas_tpu``): x ``[B, C]``, state ``[B, W - 1, C]`` ->
    ``(y [B, C] in x's dtype, new_state = [state[:, 1:], x] in x's dtype)``.

    Inference only: this kernel has no VJP (differentiate ``causal_conv1d`` instead).
    """
    no_float64(x, state, weight, bias)
    W = weight.shape[0]
    check_width(W)
    blocks = tuning.tpu_config(config, "causal_conv1d_step", interpret=interpret_mode())
    B, C = x.shape
    Cp = -(-C // LANES) * LANES
    bc = max(d for d in range(LANES, min(blocks.block_c, Cp) + 1, LANES) if Cp % d == 0)
    pad = [(0, 0), (0, Cp - C)]
    args = [
        jnp.pad(x, pad)[:, None],
        jnp.pad(state, [(0, 0), (0, 0), (0, Cp - C)]),
        jnp.pad(weight, pad),
    ]
    row = pl.BlockSpec((None, 1, bc), lambda b, c: (b, 0, c))
    st_spec = pl.BlockSpec((None, W - 1, bc), lambda b, c: (b, 0, c))
    specs = [row, st_spec, pl.BlockSpec((W, bc), lambda b, c: (0, c))]
    if bias is not None:
        args.append(jnp.pad(bias, [(0, Cp - C)])[None])
        specs.append(pl.BlockSpec((1, bc), lambda b, c: (0, c)))

    def kernel(*refs):
        if bias is None:
            refs = refs[:3] + (None,) + refs[3:]
        _step_kernel(*refs, W=W, silu=activation == "silu")

    y, ns = pl.pallas_call(
        kernel,
        grid=(B, Cp // bc),
        in_specs=specs,
        out_specs=[row, st_spec],
        out_shape=[
            jax.ShapeDtypeStruct((B, 1, Cp), x.dtype),
            jax.ShapeDtypeStruct((B, W - 1, Cp), x.dtype),
        ],
        interpret=common.interpret_params("pallas_tpu"),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
        name="causal_conv1d_step",
    )(*args)
    return y[:, 0, :C], ns[..., :C]
