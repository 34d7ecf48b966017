"""The backward kernel of chunked linear attention on a TPU: one reverse pass over blocks
holding ``dS = dL/dS_out`` in VMEM; per block it recomputes the ``m`` chunk-entry states
from the saved block state and walks the chunks in reverse (the derivation is in the
package docstring)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from seqmix.kernels.linear_attention.tpu import chunk as tc
from seqmix.kernels.linear_attention.tpu.chunk import KernelConfig
from seqmix.kernels.linear_attention.tpu.specs import (
    N_DEC,
    compiler_params,
    decay_inputs,
    interpret_params,
    specs,
    vmem_estimate,
)

F32 = jnp.float32


def _bwd_kernel(cfg: KernelConfig, *refs):
    refs = list(refs)
    q_ref, k_ref, v_ref = refs[:3]
    pos = 3
    rel_ref = dg_ref = ds0_ref = None
    dec_refs, pos = refs[pos : pos + N_DEC[cfg.kind]], pos + N_DEC[cfg.kind]
    if cfg.has_runs:
        rel_ref, pos = refs[pos], pos + 1
    do_ref, st_ref, dfinal_ref, dq_ref, dk_ref, dv_ref = refs[pos : pos + 6]
    pos += 6
    if cfg.kind != "none":
        dg_ref, pos = refs[pos], pos + 1
    if cfg.has_init:
        ds0_ref, pos = refs[pos], pos + 1
    ds_scr, s_blk, *chan = refs[pos:]
    C = cfg.chunk
    j = pl.program_id(2)
    blk = cfg.blocks - 1 - j
    nvalid = jnp.minimum(cfg.m, cfg.n - blk * cfg.m)

    @pl.when(j == 0)
    def _init():
        ds_scr[...] = dfinal_ref[...]

    b_rows = [r[...] for r in dec_refs] if cfg.kind == "scalar" else None
    rel_rows = rel_ref[...] if rel_ref is not None else None

    def chunk(i):
        sl = pl.ds(pl.multiple_of(i * C, C), C)
        dec = tc.scalar_decay(*b_rows, i) if cfg.kind == "scalar" else None
        g = dec_refs[0][sl, :] if cfg.kind == "channel" else None
        return sl, k_ref[sl, :], v_ref[sl, :], g, dec, tc.masks(C, rel_rows, i)

    # 1. The state entering every chunk of the block, from the block's entering state.
    s_blk[0] = st_ref[...]

    def fwd_body(i, carry):
        _, k, v, g, dec, msk = chunk(i)
        s_blk[i + 1] = tc.state_out(cfg, s_blk[i], k, v, g, dec, msk)
        return carry

    lax.fori_loop(0, nvalid - 1, fwd_body, 0)

    # 2. Chunks in reverse, carrying dS = dL/dS_out.
    def bwd_body(ii, dg_rows):
        i = nvalid - 1 - ii
        sl, k, v, g, dec, msk = chunk(i)
        q, do, S, dS = q_ref[sl, :], do_ref[sl, :], s_blk[i], ds_scr[...]
        if cfg.kind == "channel":
            dq, dk, dv, dg, dS_in = tc.backward_channel(cfg, q, k, v, do, g, S, dS, msk, chan)
            dg_ref[sl, :] = dg
        else:
            dq, dk, dv, dg, dS_in = tc.backward_scalar(cfg, q, k, v, do, S, dS, dec, msk)
            if dg is not None:
                dg_rows = jnp.where(tc.iota(dg_rows.shape, 0) == i, dg, dg_rows)
        dq_ref[sl, :] = dq.astype(dq_ref.dtype)
        dk_ref[sl, :] = dk.astype(dk_ref.dtype)
        dv_ref[sl, :] = dv.astype(dv_ref.dtype)
        ds_scr[...] = dS_in
        return dg_rows

    dg_rows = lax.fori_loop(0, nvalid, bwd_body, jnp.zeros((cfg.m, C), F32))
    if cfg.kind == "scalar":
        dg_ref[...] = dg_rows
    if ds0_ref is not None:

        @pl.when(j == cfg.blocks - 1)
        def _ds0():
            ds0_ref[...] = ds_scr[...]


def backward(cfg: KernelConfig, q, k, v, g, rel, states, do, dfinal):
    B, Tp = q.shape[:2]
    sp = specs(cfg, reverse=True)
    in_specs, args = [sp["qk"], sp["qk"], sp["v"]], [q, k, v]
    for x in decay_inputs(cfg, g):
        in_specs.append(sp["g"])
        args.append(x)
    if rel is not None:
        in_specs.append(sp["rows"])
        args.append(rel)
    in_specs += [sp["v"], sp["block_state"], sp["state"]]
    args += [do, states, dfinal]
    dqk_dtype = F32 if cfg.rep > 1 else jnp.dtype(cfg.dtype)
    out_shape = [jax.ShapeDtypeStruct((B, Tp, cfg.hv * cfg.kp), dqk_dtype)] * 2 + [
        jax.ShapeDtypeStruct((B, Tp, cfg.hv * cfg.vp), jnp.dtype(cfg.dtype))
    ]
    out_specs = [sp["k_per_v"], sp["k_per_v"], sp["v"]]
    if g is not None:
        out_shape.append(jax.ShapeDtypeStruct(g.shape, F32))
        out_specs.append(sp["g"])
    if cfg.has_init:
        out_shape.append(jax.ShapeDtypeStruct((B, cfg.hv, cfg.kp, cfg.vp), F32))
        out_specs.append(sp["state"])
    scratch = [pltpu.VMEM((cfg.kp, cfg.vp), F32), pltpu.VMEM((cfg.m, cfg.kp, cfg.vp), F32)]
    if cfg.kind == "channel":
        C = cfg.chunk
        scratch += [
            pltpu.VMEM((C, cfg.kp), F32),
            pltpu.VMEM((C, cfg.kp), F32),
            pltpu.VMEM((C, cfg.vp), F32),
        ] + [pltpu.VMEM((C, cfg.kp), F32)] * 4
    outs = pl.pallas_call(
        functools.partial(_bwd_kernel, cfg),
        grid=(B, cfg.hv, cfg.blocks),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        scratch_shapes=scratch,
        compiler_params=compiler_params(cfg, vmem_estimate(cfg, backward=True)),
        interpret=interpret_params(cfg),
        name="linear_attention_bwd",
    )(*args)
    dq, dk, dv = outs[:3]
    outs = list(outs[3:])
    dg = outs.pop(0) if g is not None else None
    ds0 = outs.pop(0) if cfg.has_init else None
    if cfg.rep > 1:  # v heads of one group share q/k: sum their contributions

        def group_sum(x):
            x = x.reshape(B, Tp, cfg.hv // cfg.rep, cfg.rep, cfg.kp).sum(axis=3)
            return x.reshape(B, Tp, -1).astype(cfg.dtype)

        dq, dk = group_sum(dq), group_sum(dk)
    return dq, dk, dv, dg, ds0
