"""The forward kernel of chunked linear attention on a TPU: grid ``(B, Hv, blocks)``, the
block axis sequential; each grid step walks its ``m`` chunks with the state ``S [K, V]``
(float32) in VMEM scratch, writes the outputs and (when differentiated) the state entering
the block."""

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


def _fwd_kernel(cfg: KernelConfig, save: bool, *refs):
    refs = list(refs)
    q_ref, k_ref, v_ref = refs[:3]
    pos = 3
    rel_ref = s0_ref = st_ref = None
    dec_refs, pos = refs[pos : pos + N_DEC[cfg.kind]], pos + N_DEC[cfg.kind]
    if cfg.has_runs:
        rel_ref, pos = refs[pos], pos + 1
    if cfg.has_init:
        s0_ref, pos = refs[pos], pos + 1
    o_ref, final_ref = refs[pos], refs[pos + 1]
    pos += 2
    if save:
        st_ref, pos = refs[pos], pos + 1
    s_scr, *chan = refs[pos:]
    C = cfg.chunk
    j = pl.program_id(2)

    @pl.when(j == 0)
    def _init():
        s_scr[...] = s0_ref[...] if s0_ref is not None else jnp.zeros(s_scr.shape, F32)

    if save:
        st_ref[...] = s_scr[...]
    b_rows = [r[...] for r in dec_refs] if cfg.kind == "scalar" else None
    rel_rows = rel_ref[...] if rel_ref is not None else None

    def body(i, carry):
        sl = pl.ds(pl.multiple_of(i * C, C), C)
        q, k, v = q_ref[sl, :], k_ref[sl, :], v_ref[sl, :]
        S = s_scr[...]
        msk = tc.masks(C, rel_rows, i)
        if cfg.kind == "channel":
            o, S_out = tc.forward_channel(cfg, q, k, v, dec_refs[0][sl, :], S, msk, *chan)
            s_scr[...] = S_out
        else:
            dec = tc.scalar_decay(*b_rows, i) if cfg.kind == "scalar" else None
            o = tc.forward_scalar(cfg, q, k, v, S, dec, msk)
            s_scr[...] = tc.state_out(cfg, S, k, v, None, dec, msk)
        o_ref[sl, :] = o.astype(o_ref.dtype)
        return carry

    lax.fori_loop(0, jnp.minimum(cfg.m, cfg.n - j * cfg.m), body, 0)

    @pl.when(j == cfg.blocks - 1)
    def _final():
        final_ref[...] = s_scr[...]


def forward(cfg: KernelConfig, q, k, v, g, s0, rel, save: bool):
    B, Tp = q.shape[:2]
    sp = specs(cfg, reverse=False)
    in_specs, args = [sp["qk"], sp["qk"], sp["v"]], [q, k, v]
    for x in decay_inputs(cfg, g):
        in_specs.append(sp["g"])
        args.append(x)
    for spec, x in ((sp["rows"], rel), (sp["state"], s0)):
        if x is not None:
            in_specs.append(spec)
            args.append(x)
    out_shape = [
        jax.ShapeDtypeStruct((B, Tp, cfg.hv * cfg.vp), jnp.dtype(cfg.dtype)),
        jax.ShapeDtypeStruct((B, cfg.hv, cfg.kp, cfg.vp), F32),
    ]
    out_specs = [sp["v"], sp["state"]]
    if save:
        out_shape.append(jax.ShapeDtypeStruct((B, cfg.hv, cfg.blocks, cfg.kp, cfg.vp), F32))
        out_specs.append(sp["block_state"])
    scratch = [pltpu.VMEM((cfg.kp, cfg.vp), F32)]
    if cfg.kind == "channel":
        scratch += [pltpu.VMEM((cfg.chunk, cfg.vp), F32)] + [
            pltpu.VMEM((cfg.chunk, cfg.kp), F32)
        ] * 3
    outs = pl.pallas_call(
        functools.partial(_fwd_kernel, cfg, save),
        grid=(B, cfg.hv, cfg.blocks),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        scratch_shapes=scratch,
        compiler_params=compiler_params(cfg, vmem_estimate(cfg, backward=False)),
        interpret=interpret_params(cfg),
        name="linear_attention_fwd",
    )(*args)
    return outs[0], outs[1], (outs[2] if save else None)
