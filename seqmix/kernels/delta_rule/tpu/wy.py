"""The delta rule's WY transform per chunk as Pallas TPU kernels, forward and backward.

Arrays travel chunk-major, ``[B, H, n, C, D]`` (per-token scalars as columns ``[.., C, 1]``
and rows ``[.., 1, C]``), so that every block's last two dimensions are whole and a grid
step ``(batch * head, chunk block)`` takes ``chunks_per_step`` chunks and walks them in a
loop. The algebra is ``delta_rule.chunk`` with float32 matmuls on the MXU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from seqmix.kernels import common
from seqmix.kernels.delta_rule import chunk as wy_math

f32 = jnp.float32


def _dot(a, b, trans_a=False, trans_b=False):
    dims = (((0,) if trans_a else (1,)), ((1,) if trans_b else (0,)))
    return lax.dot_general(
        a, b, (dims, ((), ())), precision=lax.Precision.HIGHEST, preferred_element_type=f32
    )


def _chunk_inputs(refs, i, decay: bool):
    k_ref, v_ref, beta_ref, keep_ref, rc_ref, rr_ref = refs[:6]
    b_c = b_r = None
    if decay:
        b_c, b_r = refs[6][i], refs[7][i]
    C = k_ref.shape[1]
    t, s = wy_math.iota((C, C), 0), wy_math.iota((C, C), 1)
    pair = (t > s) & (rc_ref[i] == rr_ref[i])
    return k_ref[i], v_ref[i], beta_ref[i], b_c, b_r, pair, keep_ref[i] > 0.5


def _forward_kernel(*refs, decay: bool, cps: int):
    n_in = 8 if decay else 6
    w_ref, u_ref = refs[n_in:]
    for i in range(cps):
        k, v, beta_c, b_c, b_r, pair, keep_c = _chunk_inputs(refs, i, decay)
        w, u = wy_math.wy_forward(_dot, _dot, k, v, beta_c, b_c, b_r, pair, keep_c)
        w_ref[i] = w
        u_ref[i] = u


def _backward_kernel(*refs, decay: bool, cps: int):
    n_in = 8 if decay else 6
    dw_ref, du_ref = refs[n_in : n_in + 2]
    outs = refs[n_in + 2 :]
    dk_ref, dv_ref, dbeta_ref = outs[:3]
    for i in range(cps):
        k, v, beta_c, b_c, b_r, pair, keep_c = _chunk_inputs(refs, i, decay)
        dk, dv, dbeta, db_c, db_r = wy_math.wy_backward(
            _dot, _dot, k, v, beta_c, b_c, b_r, pair, keep_c, du_ref[i], dw_ref[i]
        )
        dk_ref[i] = dk
        dv_ref[i] = dv
        dbeta_ref[i] = dbeta
        if decay:
            outs[3][i] = db_c
            outs[4][i] = db_r


def _specs(H: int, cps: int, shapes, shared_batch=()):
    """BlockSpecs of ``[B, H, n, a, b]`` arrays (``[B, 1, n, a, b]`` for the indices in
    ``shared_batch``: one per row, shared by its heads) over ``(batch * head, block)``."""
    out = []
    for idx, shape in enumerate(shapes):
        if idx in shared_batch:
            out.append(pl.BlockSpec((None, None, cps) + shape, lambda bh, c: (bh // H, 0, c, 0, 0)))
        else:
            out.append(
                pl.BlockSpec((None, None, cps) + shape, lambda bh, c: (bh // H, bh % H, c, 0, 0))
            )
    return out


def _call(kernel, args, shapes, shared, out_shapes, cps, name):
    B, H, n = args[0].shape[:3]
    return pl.pallas_call(
        kernel,
        grid=(B * H, n // cps),
        in_specs=_specs(H, cps, shapes, shared),
        out_specs=_specs(H, cps, [s.shape[3:] for s in out_shapes]),
        out_shape=out_shapes,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
        interpret=common.interpret_params("pallas_tpu"),
        name=name,
    )(*args)


def _layout(k, v, beta, b, keep, runs):
    """Inputs and their block shapes: k, v ``[B, H, n, C, D]``; beta, keep, run columns,
    run rows and (b column, b row)."""
    C = k.shape[3]
    args = [k, v, beta[..., None], keep[..., None], runs[..., None], runs[..., None, :]]
    shapes = [(C, k.shape[4]), (C, v.shape[4]), (C, 1), (C, 1), (C, 1), (1, C)]
    if b is not None:
        args += [b[..., None], b[..., None, :]]
        shapes += [(C, 1), (1, C)]
    return args, shapes


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def wy_transform(k, v, beta, b, keep, runs, cps, decay):
    """``(w, u)`` float32 ``[B, H, n, C, K | V]`` of every chunk. k ``[B, H, n, C, K]``,
    v ``[B, H, n, C, V]``, beta and b (inclusive cumulative log decay per chunk; ignored
    unless ``decay``) ``[B, H, n, C]``, keep ``[B, 1, n, C]`` float (1 where the entering
    state reaches the token), runs ``[B, 1, n, C]`` float run indices. Differentiable in k,
    v, beta and b; ``n`` a multiple of ``cps``."""
    args, shapes = _layout(k, v, beta, b if decay else None, keep, runs)
    B, H, n, C = k.shape[:4]
    out = [
        jax.ShapeDtypeStruct((B, H, n, C, k.shape[4]), f32),
        jax.ShapeDtypeStruct((B, H, n, C, v.shape[4]), f32),
    ]
    w, u = _call(
        functools.partial(_forward_kernel, decay=decay, cps=cps),
        args,
        shapes,
        (3, 4, 5),
        out,
        cps,
        "gated_delta_rule_wy",
    )
    return w, u


def _wy_fwd(k, v, beta, b, keep, runs, cps, decay):
    return wy_transform(k, v, beta, b, keep, runs, cps, decay), (k, v, beta, b, keep, runs)


def _wy_bwd(cps, decay, res, cts):
    k, v, beta, b, keep, runs = res
    dw, du = cts
    args, shapes = _layout(k, v, beta, b if decay else None, keep, runs)
    B, H, n, C = k.shape[:4]
    args += [dw.astype(f32), du.astype(f32)]
    shapes += [(C, k.shape[4]), (C, v.shape[4])]
    out = [
        jax.ShapeDtypeStruct((B, H, n, C, k.shape[4]), f32),
        jax.ShapeDtypeStruct((B, H, n, C, v.shape[4]), f32),
        jax.ShapeDtypeStruct((B, H, n, C, 1), f32),
    ]
    if decay:
        out += [
            jax.ShapeDtypeStruct((B, H, n, C, 1), f32),
            jax.ShapeDtypeStruct((B, H, n, 1, C), f32),
        ]
    res = _call(
        functools.partial(_backward_kernel, decay=decay, cps=cps),
        args,
        shapes,
        (3, 4, 5),
        out,
        cps,
        "gated_delta_rule_wy_backward",
    )
    db = res[3][..., 0] + res[4][..., 0, :] if decay else jnp.zeros_like(b)
    return res[0], res[1], res[2][..., 0], db, jnp.zeros_like(keep), jnp.zeros_like(runs)


wy_transform.defvjp(_wy_fwd, _wy_bwd)
