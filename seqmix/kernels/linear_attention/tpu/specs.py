"""The pallas_call plumbing shared by the TPU linear-attention kernels: block specs of the
laid-out operands, compiler parameters with the VMEM budget, and the decay operands."""

from __future__ import annotations

import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from seqmix.kernels import common
from seqmix.kernels.linear_attention.tpu import chunk as tc
from seqmix.kernels.linear_attention.tpu.chunk import KernelConfig

N_DEC = {"none": 0, "scalar": 2, "channel": 1}  # decay inputs: -, (b hi, b lo) rows, g


def specs(cfg: KernelConfig, reverse: bool):
    """BlockSpecs of the laid-out operands; ``reverse`` walks the blocks backwards."""
    C, m, rep = cfg.chunk, cfg.m, cfg.rep
    last = cfg.blocks - 1

    def blk(j):
        return last - j if reverse else j

    tok = m * C
    qk = pl.BlockSpec((None, tok, cfg.kp), lambda b, h, j: (b, blk(j), h // rep))
    k_per_v = pl.BlockSpec((None, tok, cfg.kp), lambda b, h, j: (b, blk(j), h))  # dq, dk, g
    vv = pl.BlockSpec((None, tok, cfg.vp), lambda b, h, j: (b, blk(j), h))
    rows_h = pl.BlockSpec((None, None, m, C), lambda b, h, j: (b, h, blk(j), 0))
    rows = pl.BlockSpec((None, m, C), lambda b, h, j: (b, blk(j), 0))
    state = pl.BlockSpec((None, None, cfg.kp, cfg.vp), lambda b, h, j: (b, h, 0, 0))
    block_state = pl.BlockSpec(
        (None, None, None, cfg.kp, cfg.vp), lambda b, h, j: (b, h, blk(j), 0, 0)
    )
    g = None if cfg.kind == "none" else (rows_h if cfg.kind == "scalar" else k_per_v)
    return dict(qk=qk, k_per_v=k_per_v, v=vv, g=g, rows=rows, state=state, block_state=block_state)


def compiler_params(cfg: KernelConfig, vmem_bytes: int):
    limit = min(max(int(vmem_bytes * 1.5) + (8 << 20), 32 << 20), 64 << 20)
    return pltpu.CompilerParams(
        dimension_semantics=("parallel", "parallel", "arbitrary"), vmem_limit_bytes=limit
    )


def interpret_params(cfg: KernelConfig):
    return common.interpret_params("pallas_tpu", cfg.interpret)


def vmem_estimate(cfg: KernelConfig, backward: bool) -> int:
    tok, isz = cfg.m * cfg.chunk, jnp.dtype(cfg.dtype).itemsize
    kv = cfg.kp * cfg.vp * 4
    per_tok = (2 * cfg.kp + cfg.vp) * isz + (cfg.kp * 4 if cfg.kind == "channel" else 8)
    if backward:
        dqk = 4 if cfg.rep > 1 else isz
        per_tok += cfg.vp * isz + 2 * cfg.kp * dqk + cfg.vp * isz
        per_tok += cfg.kp * 4 if cfg.kind == "channel" else 4
        return 2 * tok * per_tok + (cfg.m + 4) * kv + 8 * cfg.chunk * (cfg.kp + cfg.vp) * 4
    per_tok += cfg.vp * isz
    return 2 * tok * per_tok + 5 * kv + 4 * cfg.chunk * (cfg.kp + cfg.vp) * 4


def decay_inputs(cfg: KernelConfig, g):
    """The kernels' decay operands: g per channel, or the chunk-local compensated prefix
    sums (hi, lo) of scalar g, computed here in XLA (4 bytes per token and head)."""
    if cfg.kind == "none":
        return []
    return [g] if cfg.kind == "channel" else list(tc.chunk_prefix_sums(g))
