"""The static plan of one chunked linear-attention call (Pallas Triton): padded shapes,
blocks, dtypes and the two-level state pass, resolved from ``tuning.TritonConfig``.

Two-level state passes (``state_segments``: "auto", the default; an int ``P``; 1 = one pass)
--------------------------------------------------------------------------------------------
The state pass is one dependent chain of ``n = T / C`` steps per (batch, v head, state
block); at small batch there are too few chains to fill the GPU (``B = 1, H = 16``: 64
chains of 64x64 blocks, 256 after halving to 32x32, against 132 SMs that each keep ~4
resident) and each is ``n`` steps long. The two-level pass splits the chunks into ``P``
segments of ``segment_chunks``:

  1. every (segment, batch, head, state block) walks its chunks from a zero state, storing
     the LOCAL state entering each chunk, the factor ``f_c`` (product of the chunk decays
     from the segment start, ``[K]`` per channel; 0 once the run changes: segment resets
     stay exact), its local end state and its total decay ``a_p``;
  2. ``state.combine_segments``: ``entering_{p+1} = a_p * entering_p + end_p`` (``P`` steps,
     float32), whose last value is the final state;
  3. the output kernel completes each state tile in registers, ``S_c = local_c + f_c *
     entering_p``, so no pass rewrites the stored states. The backward does the same in
     reverse for ``dS`` (factor: decays from the chunk's end to the segment's end) and
     ``chunk_dv`` / ``chunk_dqk`` complete both ``S_c`` and ``dS_{c+1}``.

"auto" keeps one pass while the single-level grid already has ``min_state_programs`` (2 per
SM) programs, else takes ``P = ceil(segment_programs / programs)`` (4 per SM), at least
``min_segment_chunks`` chunks per segment, and never halves the 64x64 state blocks.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax.experimental.pallas import triton as plgpu

from seqmix.kernels import dispatch
from seqmix.kernels.common import pow2_at_least, round_up
from seqmix.kernels.linear_attention import tuning
from seqmix.kernels.linear_attention.tuning import TritonConfig

_MMA = {"bfloat16": "bfloat16", "float16": "float16", "float32": "float32"}
_STATE_MMA = {"bfloat16": "bfloat16", "float16": "tfloat32", "float32": "float32"}


@dataclasses.dataclass(frozen=True)
class Plan:
    """Static description of one call: shapes (padded), blocks, dtypes, features.

    ``mma`` is the operand dtype of the matmuls: the input dtype for bf16/fp16, ``"float32"``
    (IEEE, exact) for float32 inputs. ``state_mma`` is the operand dtype of the matmuls that
    read a chunk state or state gradient, which are stored in ``state_dtype``.
    """

    batch: int
    time: int  # padded to a multiple of chunk
    qk_heads: int
    v_heads: int
    key_dim: int  # padded to a multiple of block_k and state_block_k
    value_dim: int  # padded to a multiple of block_v and state_block_v
    chunk: int
    sub_chunk: int  # == chunk unless decay == "channel"
    decay: str  # "none" | "scalar" | "channel"
    has_runs: bool
    has_initial: bool
    scale: float
    dtype: str  # input dtype name
    mma: str
    state_mma: str
    state_dtype: str
    block_k: int
    block_v: int
    state_block_k: int
    state_block_v: int
    split_scores: bool  # score matrices as two half-precision parts (see dot_split)
    warps: tuple  # (("state", n), ("output", n), ...) as a hashable mapping
    stages: tuple
    interpret: bool
    # Two-level state pass: the chunks split into ``segments`` runs of ``segment_chunks``
    # (the last one shorter) walked in parallel; 1 = one sequential pass (the default).
    segments: int = 1
    segment_chunks: int = 0  # chunks per segment (== chunks when segments == 1)
    save_states: bool = False  # the forward keeps its states for the backward

    @property
    def groups(self) -> int:
        return self.v_heads // self.qk_heads

    @property
    def chunks(self) -> int:
        return self.time // self.chunk

    @property
    def subs(self) -> int:
        return self.chunk // self.sub_chunk

    @property
    def segmented(self) -> bool:
        return self.segments > 1

    def compiler_params(self, kernel: str):
        return plgpu.CompilerParams(
            num_warps=dict(self.warps)[kernel], num_stages=dict(self.stages)[kernel]
        )

    # grid index of a (batch, v head) pair -> (batch, v head, q/k head)
    def heads(self, bh):
        b = bh // self.v_heads
        h = bh % self.v_heads
        return b, h, h // self.groups


def make_plan(
    q, v, g, initial_state, runs, *, scale, chunk_size, config: TritonConfig | None = None
) -> Plan:
    """Resolves blocks, padding and dtypes for one call (``config``: ``tuning.TritonConfig``,
    None: the table's); raises NotImplementedError for arguments the kernels cannot serve."""
    B, T, Hqk, K = q.shape
    Hv, V = v.shape[2], v.shape[3]
    decay = "none" if g is None else ("scalar" if g.ndim == 3 else "channel")
    cfg = tuning.triton_config(config, decay, interpret=dispatch.interpret_mode())
    dtype = jnp.dtype(q.dtype).name
    if dtype not in _MMA:
        raise NotImplementedError(
            f"pallas_triton linear_attention supports bfloat16, float16 and float32 inputs, "
            f"got {dtype}"
        )
    C = chunk_size
    if C < 16 or C & (C - 1):
        raise NotImplementedError(
            f"pallas_triton linear_attention needs chunk_size a power of two >= 16 (the "
            f"matmul tiles of Triton), got {chunk_size}"
        )
    sub = min(cfg.sub_chunk, C) if decay == "channel" else C
    if sub < 16 or C % sub or sub & (sub - 1):
        raise NotImplementedError(
            f"sub_chunk must be a power of two >= 16 dividing chunk_size, got {sub}"
        )

    def block(want, dim):
        return max(16, min(want, pow2_at_least(dim)))

    bk, bv = block(cfg.block_k, K), block(cfg.block_v, V)
    sbk, sbv = block(cfg.state_block, K), block(cfg.state_block, V)
    chunks = round_up(T, C) // C
    segments = _segment_count(cfg, B * Hv * -(-K // sbk) * -(-V // sbv), chunks)
    segment_chunks = -(-chunks // segments)
    segments = -(-chunks // segment_chunks)  # no empty segment
    while (
        segments == 1
        and B * Hv * -(-K // sbk) * -(-V // sbv) < cfg.min_state_programs
        and max(sbk, sbv) > 32
    ):
        if sbv >= sbk:
            sbv //= 2
        else:
            sbk //= 2
    half = dtype in ("bfloat16",) and cfg.state_dtype == "input"
    return Plan(
        batch=B,
        time=round_up(T, C),
        qk_heads=Hqk,
        v_heads=Hv,
        key_dim=round_up(K, max(bk, sbk)),
        value_dim=round_up(V, max(bv, sbv)),
        chunk=C,
        sub_chunk=sub,
        decay=decay,
        has_runs=runs is not None,
        has_initial=initial_state is not None,
        scale=float(scale),
        dtype=dtype,
        mma=cfg.mma or _MMA[dtype],
        state_mma=cfg.state_mma or _STATE_MMA[dtype],
        state_dtype="bfloat16" if half else "float32",
        block_k=bk,
        block_v=bv,
        state_block_k=sbk,
        state_block_v=sbv,
        split_scores=bool(cfg.split_scores),
        warps=tuple(sorted(dataclasses.asdict(cfg.num_warps).items())),
        stages=tuple(sorted(dataclasses.asdict(cfg.num_stages).items())),
        interpret=dispatch.interpret_mode(),
        segments=segments,
        segment_chunks=segment_chunks,
        save_states=bool(cfg.save_states),
    )


def _segment_count(cfg: TritonConfig, programs: int, chunks: int) -> int:
    """Segments of the two-level state pass (1: one sequential pass); see
    ``tuning.TritonConfig``."""
    want = cfg.state_segments
    if want == "auto":
        if programs >= cfg.min_state_programs:
            return 1
        wanted = -(-cfg.segment_programs // programs)
        return max(1, min(wanted, chunks // max(1, cfg.min_segment_chunks)))
    if isinstance(want, int) and not isinstance(want, bool) and want >= 1:
        return min(want, chunks)
    raise ValueError(f'TritonConfig.state_segments must be a positive int or "auto", got {want!r}')
