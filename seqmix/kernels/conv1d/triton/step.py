"""One decoding token of the causal convolution as a Pallas Triton kernel."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from seqmix.kernels.common import no_float64
from seqmix.kernels.conv1d import tuning
from seqmix.kernels.conv1d.triton.ops import check_width
from seqmix.kernels.dispatch import interpret_mode


def _step_kernel(x_ref, s_ref, w_ref, bias_ref, y_ref, ns_ref, *, W, silu, block_c):
    b = pl.program_id(0)
    cols = pl.program_id(1) * block_c + jnp.arange(block_c)
    cmask = cols < x_ref.shape[1]
    rows = [plgpu.load(s_ref.at[b, k, cols], mask=cmask, other=0.0) for k in range(W - 1)]
    xt = plgpu.load(x_ref.at[b, cols], mask=cmask, other=0.0)
    taps = rows + [xt]
    pre = jnp.zeros((block_c,), jnp.float32)
    for j in range(W):
        w = plgpu.load(w_ref.at[j, cols], mask=cmask, other=0.0).astype(jnp.float32)
        pre = pre + w * taps[j].astype(jnp.float32)
    if bias_ref is not None:
        pre = pre + plgpu.load(bias_ref.at[cols], mask=cmask, other=0.0).astype(jnp.float32)
    y = pre * jax.nn.sigmoid(pre) if silu else pre
    plgpu.store(y_ref.at[b, cols], y.astype(y_ref.dtype), mask=cmask)
    for k in range(W - 1):
        plgpu.store(ns_ref.at[b, k, cols], taps[k + 1].astype(ns_ref.dtype), mask=cmask)


def causal_conv1d_step(
    x,
    state,
    weight,
    bias=None,
    *,
    activation=None,
    config: tuning.TritonConfig | None = None,
):
    """One decoding token (``pallas_triton``): x ``[B, C]``, state ``[B, W - 1, C]`` ->
    ``(y [B, C] in x's dtype, new_state = [state[:, 1:], x] in x's dtype)``.

    Inference only: this kernel has no VJP (differentiate ``causal_conv1d`` instead).
    """
    no_float64(x, state, weight, bias)
    W = weight.shape[0]
    check_width(W)
    blocks = tuning.triton_config(config, "causal_conv1d_step", interpret=interpret_mode())
    B, C = x.shape
    bc = blocks.block_c
    args = [x, state, weight] + ([bias] if bias is not None else [])

    def kernel(*refs):
        if bias is None:
            refs = refs[:3] + (None,) + refs[3:]
        _step_kernel(*refs, W=W, silu=activation == "silu", block_c=bc)

    return tuple(
        pl.pallas_call(
            kernel,
            grid=(B, pl.cdiv(C, bc)),
            out_shape=[
                jax.ShapeDtypeStruct(x.shape, x.dtype),
                jax.ShapeDtypeStruct(state.shape, x.dtype),
            ],
            interpret=interpret_mode(),
            compiler_params=plgpu.CompilerParams(num_warps=blocks.num_warps, num_stages=1),
            name="causal_conv1d_step",
        )(*args)
    )
