"""One decoding step of the gated delta rule for a batch of rows, as a Pallas TPU kernel.

    S' = exp(g) S,   S'' = S' + beta k (v - k^T S')^T,   o = scale * S''^T q

per row and v head, with ``S`` float32 ``[K, V]``. The step is bound by reading and
writing the state; a grid step takes one (row, v head) and the new state aliases the old
one. q and k travel as columns ``[K, 1]`` and v and o as rows ``[1, V]`` (q/k repeated to
the v heads outside: they are tiny), so the kernel needs no transpose.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from seqmix.kernels import common
from seqmix.kernels.delta_rule import tuning
from seqmix.kernels.dispatch import interpret_mode

F32 = jnp.float32


def _step_kernel(q_ref, k_ref, v_ref, beta_ref, *refs, scale: float, decay: bool):
    if decay:
        g_ref, s_ref, o_ref, ns_ref = refs
    else:
        s_ref, o_ref, ns_ref = refs
    S = s_ref[...]
    if decay:
        S = jnp.exp(g_ref[...]) * S
    k = k_ref[...].astype(F32)  # [K, 1]
    pred = jnp.sum(k * S, axis=0, keepdims=True)  # [1, V]
    S = S + k * (beta_ref[...] * (v_ref[...].astype(F32) - pred))
    ns_ref[...] = S
    o = jnp.sum(q_ref[...].astype(F32) * S, axis=0, keepdims=True)
    o_ref[...] = (scale * o).astype(o_ref.dtype)


def gated_delta_rule_step(q, k, v, beta, state, g, *, scale, config=None):
    """q, k ``[B, Hqk, K]``; v ``[B, Hv, V]``; beta ``[B, Hv]``; state float32
    ``[B, Hv, K, V]``; g None or ``[B, Hv]``. Returns ``(o [B, Hv, V] in q's dtype,
    new_state float32)``. ``config``: ``tuning.TpuStepConfig`` (None: the table's; one
    head per grid step whatever its ``state_bytes_per_step``)."""
    tuning.tpu_step_config(config, interpret=interpret_mode())
    B, Hqk, K = q.shape
    Hv, V = v.shape[1], v.shape[2]
    rep = Hv // Hqk
    q = jnp.repeat(q, rep, axis=1)[..., None]  # [B, Hv, K, 1]
    k = jnp.repeat(k, rep, axis=1)[..., None]
    col = pl.BlockSpec((None, None, K, 1), lambda b, h: (b, h, 0, 0))
    row = pl.BlockSpec((None, None, 1, V), lambda b, h: (b, h, 0, 0))
    one = pl.BlockSpec((None, None, 1, 1), lambda b, h: (b, h, 0, 0))
    st = pl.BlockSpec((None, None, K, V), lambda b, h: (b, h, 0, 0))
    args = [q, k, v[:, :, None], beta.astype(F32)[..., None, None]]
    specs = [col, col, row, one]
    if g is not None:
        args.append(g.astype(F32)[..., None, None])
        specs.append(one)
    args.append(state.astype(F32))
    specs.append(st)
    o, new_state = pl.pallas_call(
        functools.partial(_step_kernel, scale=float(scale), decay=g is not None),
        grid=(B, Hv),
        in_specs=specs,
        out_specs=[row, st],
        out_shape=[
            jax.ShapeDtypeStruct((B, Hv, 1, V), q.dtype),
            jax.ShapeDtypeStruct((B, Hv, K, V), F32),
        ],
        input_output_aliases={len(args) - 1: 1},
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
        interpret=common.interpret_params("pallas_tpu"),
        name="gated_delta_rule_step",
    )(*args)
    return o[:, :, 0], new_state
