"""The forward kernel of the causal convolution on a TPU: per ``[block_t, block_c]`` tile the
tile and its halo are converted once to a float32 VMEM scratch and the W taps are static
sublane-offset reads of it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from seqmix.kernels.conv1d.tpu.tiles import (
    HALO,
    Static,
    fill_history,
    interpret_params,
    preactivation,
    specs,
)


def _fwd_kernel(x_ref, halo_ref, w_ref, bias_ref, h_ref, y_ref, xe_ref, *, st: Static):
    Tc = st.block_t
    fill_history(xe_ref, halo_ref, h_ref, pl.program_id(2))
    xe_ref[pl.ds(HALO, Tc), :] = x_ref[...].astype(jnp.float32)
    pre = preactivation(xe_ref, w_ref, bias_ref, st.W, HALO - (st.W - 1), Tc)
    y = pre * jax.nn.sigmoid(pre) if st.silu else pre
    y_ref[...] = y.astype(y_ref.dtype)


def forward(st, x, weight, bias, hist):
    B, Tp, Cp = x.shape
    nT = Tp // st.block_t
    sp = specs(st, nT)
    args = [
        (x, sp["tile"]),
        (x, sp["before"]),
        (weight, sp["w"]),
        (bias, sp["row"]),
        (hist, sp["hist"]),
    ]
    present = [a is not None for a, _ in args]

    def kernel(*refs):
        it = iter(refs)
        ins = [next(it) if p else None for p in present]
        _fwd_kernel(*ins, *it, st=st)

    return pl.pallas_call(
        kernel,
        grid=(B, Cp // st.block_c, nT),
        in_specs=[s for a, s in args if a is not None],
        out_specs=sp["tile"],
        out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
        scratch_shapes=[pltpu.VMEM((HALO + st.block_t, st.block_c), jnp.float32)],
        interpret=interpret_params(st),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel")
        ),
        name="causal_conv1d_fwd",
    )(*[a for a, _ in args if a is not None])
