"""The static description of one call of the Mosaic GPU engine (``Plan``): padding, value
blocks and state-pass segments from the arguments and the call's
``tuning.MosaicGpuConfig``."""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp

from seqmix.kernels import common, dispatch
from seqmix.kernels.linear_attention import tuning
from seqmix.kernels.linear_attention.tuning import MosaicGpuConfig

# The wgmma tile: a chunk is one warpgroup's M = 64 rows.
CHUNK = 64
# Key dims the kernels hold whole in one warpgroup (states [K, block_v] and the [C, K]
# gradient accumulators in registers).
MAX_KEY_DIM = 128


@dataclasses.dataclass(frozen=True)
class Plan:
    """Static description of one call on padded arrays: ``time = chunks * chunk`` with
    ``chunks = segments * segment_chunks`` and a multiple of ``chunks_per_program``."""

    batch: int
    time: int
    qk_heads: int
    v_heads: int
    key_dim: int
    value_dim: int
    block_v: int
    block_v_grad: int
    chunk: int
    chunks: int
    segments: int
    segment_chunks: int
    chunks_per_program: int
    decay: str  # "none" | "scalar" | "channel"
    has_runs: bool
    has_initial: bool
    scale: float
    dtype: str
    depth: int
    split_scores: bool
    interpret: object  # False or plgpu.InterpretGPUParams
    save_states: bool = False  # the forward keeps its chunk states for the backward

    @property
    def groups(self) -> int:
        return self.v_heads // self.qk_heads

    @property
    def value_blocks(self) -> int:
        return self.value_dim // self.block_v

    @property
    def grad_value_blocks(self) -> int:
        return self.value_dim // self.block_v_grad

    def heads(self, bh):
        """(batch, v head, q/k head) of a flat ``batch * v_heads`` index."""
        b = bh // self.v_heads
        h = bh % self.v_heads
        return b, h, h // self.groups


def _segments(cfg: MosaicGpuConfig, programs: int, chunks: int) -> int:
    want = cfg.state_segments
    if want == "auto":
        if programs >= cfg.min_state_programs:
            return 1
        wanted = -(-cfg.segment_programs // programs)
        return max(1, min(wanted, chunks // cfg.min_segment_chunks))
    return min(want, chunks)


def _interpret(detect_races: bool):
    """``False`` natively; in interpret mode the Mosaic GPU interpreter's parameters, with
    its race detector on where asked."""
    params = common.interpret_params("pallas_mosaic_gpu")
    if params is False or not detect_races:
        return params
    return dataclasses.replace(params, detect_races=True)


def make_plan(
    q, v, g, initial_state, runs, *, scale, chunk_size, config: MosaicGpuConfig | None = None
) -> Plan:
    """Resolves the Config (``tuning.mosaic_gpu_config``: table, tuning file, ``config``),
    padding, blocks and segments; raises NotImplementedError for arguments the kernels
    cannot serve."""
    dtype = jnp.dtype(q.dtype).name
    if dtype not in ("bfloat16", "float16"):
        raise NotImplementedError(
            "pallas_mosaic_gpu linear_attention runs its matmuls as wgmma on bf16/fp16 "
            f"operands; got {dtype} inputs (float32 needs exact matmuls: pallas_triton or xla)"
        )
    if chunk_size != CHUNK:
        raise NotImplementedError(
            f"pallas_mosaic_gpu linear_attention needs chunk_size={CHUNK} (one wgmma tile of "
            f"M = 64 rows per chunk), got {chunk_size}"
        )
    decay = "none" if g is None else ("scalar" if g.ndim == 3 else "channel")
    interpret = dispatch.interpret_mode()
    cfg = tuning.mosaic_gpu_config(config, decay, interpret=interpret)
    B, T, Hqk, K = q.shape
    Hv, V = v.shape[2], v.shape[3]
    Kp = common.round_up(K, 64)
    if Kp > MAX_KEY_DIM:
        raise NotImplementedError(
            f"pallas_mosaic_gpu linear_attention supports key_dim <= {MAX_KEY_DIM} (the "
            f"state and gradient tiles of one warpgroup), got {K}"
        )
    V64 = common.round_up(V, 64)
    bv = cfg.block_v if V64 % cfg.block_v == 0 else 64
    bvg = cfg.block_v_grad if V64 % cfg.block_v_grad == 0 else 64
    Vp = V64
    C = CHUNK
    chunks = -(-T // C)
    programs = B * Hv * (Vp // bv)
    P = _segments(cfg, programs, chunks)
    Ls = -(-chunks // P)
    P = -(-chunks // Ls)  # no empty segment
    G = math.gcd(P * Ls, cfg.chunks_per_program)
    n = P * Ls
    return Plan(
        batch=B,
        time=n * C,
        qk_heads=Hqk,
        v_heads=Hv,
        key_dim=Kp,
        value_dim=Vp,
        block_v=bv,
        block_v_grad=bvg,
        chunk=C,
        chunks=n,
        segments=P,
        segment_chunks=Ls,
        chunks_per_program=G,
        decay=decay,
        has_runs=runs is not None,
        has_initial=initial_state is not None,
        scale=float(scale),
        dtype=dtype,
        depth=cfg.depth,
        split_scores=cfg.split_scores,
        interpret=_interpret(cfg.detect_races) if interpret else False,
        save_states=bool(cfg.save_states),
    )
