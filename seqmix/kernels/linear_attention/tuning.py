"""Tuning of the linear-attention kernels: the Configs of the Pallas backends and their
tables (see ``seqmix.kernels.tune`` for how a call's Config is resolved).

The Triton and Mosaic GPU chunk kernels' tables are keyed by GPU generation and decay kind
(the tuning key: ``"none"``, ``"scalar"`` or ``"channel"``); the decoding step's and the TPU
kernels' tables have one row (key ``"default"``). The Mosaic GPU engine is built for Hopper
(wgmma): its table has Hopper rows only, and other GPUs fall back to another backend.
"""

from __future__ import annotations

import dataclasses

import jax

from seqmix.kernels import tune
from seqmix.kernels.common import current_device_kind, generation
from seqmix.kernels.tune import Axis

DEFAULT_KEY = "default"


@dataclasses.dataclass(frozen=True)
class PerKernel:
    """One number per Triton kernel of the chunked form: the state pass, its reverse pass,
    the output kernel and the two gradient kernels (None: the table's)."""

    state: int | None = None
    dstate: int | None = None
    output: int | None = None
    dv: int | None = None
    dqk: int | None = None


@dataclasses.dataclass(frozen=True)
class TritonConfig:
    """``pallas_triton`` linear_attention (None: the table's).

    Attributes:
      block_k, block_v: key / value block of the output and gradient kernels (<= 64 keeps
        tiles in registers).
      state_block: block of the state per program of the state passes; halved (down to 32)
        while fewer than ``min_state_programs`` programs would run, since each walks all
        chunks in order.
      sub_chunk: sub-chunk of per-channel decays (the ``[L, L, block_k]`` diagonal blocks).
      state_dtype: chunk states in HBM: ``"input"`` stores them in bf16 for bf16 inputs (the
        matmul that reads them takes bf16 operands anyway), float32 otherwise; ``"float32"``.
      split_scores: score matrices (decayed q k^T and its gradient) enter their matmuls as
        two bf16/fp16 parts (hi + lo): one more small matmul each, ~16 mantissa bits, not 8.
      mma, state_mma: matmul operand dtypes; left None by the tables: derived from the input
        dtype (bf16/fp16 operands with float32 accumulation; float32 inputs use exact IEEE
        float32 matmuls). ``"float32"`` makes every matmul exact at a large speed cost.
      num_warps, num_stages: per kernel (``PerKernel``).
      state_segments: two-level state passes (``triton/plan.py``): 1 = one sequential pass
        over all chunks; an int P = P segments; ``"auto"`` = P from the grid.
      segment_programs, min_segment_chunks: "auto" takes P = ceil(segment_programs /
        programs) when fewer than ``min_state_programs`` programs would run, with at least
        ``min_segment_chunks`` chunks per segment.
      save_states: the forward's chunk states are kept for the backward, which otherwise
        recomputes them (the state pass a second time); memory per call: the states,
        ``[B, T / chunk, H, K, V]`` in the state dtype.
    """

    block_k: int | None = None
    block_v: int | None = None
    state_block: int | None = None
    min_state_programs: int | None = None
    sub_chunk: int | None = None
    state_dtype: str | None = None
    split_scores: bool | None = None
    mma: str | None = None
    state_mma: str | None = None
    num_warps: PerKernel | None = None
    num_stages: PerKernel | None = None
    state_segments: int | str | None = None
    segment_programs: int | None = None
    min_segment_chunks: int | None = None
    save_states: bool | None = None


@dataclasses.dataclass(frozen=True)
class MosaicGpuConfig:
    """``pallas_mosaic_gpu`` linear_attention (None: the table's).

    Attributes:
      block_v: value columns per program of the state and output kernels (64 or 128; 64
        where padding the value dim to 128 would add columns).
      block_v_grad: value columns per program of the dv kernel and per pipeline step of the
        dq / dk kernel (64 or 128).
      chunks_per_program: chunks one program of the output / gradient kernels walks through
        its TMA pipeline (fewer, longer programs amortise the pipeline's prologue).
      depth: TMA pipeline depth (steps of inputs in flight).
      split_scores: score matrices enter their matmuls as two bf16/fp16 parts (``hi +
        lo``: ~16 mantissa bits, one more wgmma each) instead of one (8 bits).
      state_segments: the two-level state pass: 1 = one sequential pass per (batch, head,
        value block); an int ``P`` = ``P`` segments that walk their chunks in parallel from
        a zero state, whose end states are combined (``P`` steps in XLA) before a second
        pass from the true entering states stores the chunk states; ``"auto"`` = ``P`` from
        the grid.
      min_state_programs: "auto" keeps one pass while it already has this many programs
        (a state-pass program holds one SM: 128 of them keep 97% of 132 SMs busy).
      segment_programs: "auto" aims at this many programs of the segmented pass (two
        waves on 132 SMs).
      min_segment_chunks: "auto" never makes segments shorter than this.
      detect_races: interpret mode only: run the Mosaic GPU interpreter's race detector.
      save_states: the forward's chunk states are kept for the backward, which otherwise
        recomputes them (the state pass, with its segments, a second time); memory per
        call: the states, ``[B, T / 64, H, K, V]`` float32.
    """

    block_v: int | None = None
    block_v_grad: int | None = None
    chunks_per_program: int | None = None
    depth: int | None = None
    split_scores: bool | None = None
    state_segments: int | str | None = None
    min_state_programs: int | None = None
    segment_programs: int | None = None
    min_segment_chunks: int | None = None
    detect_races: bool | None = None
    save_states: bool | None = None

    def __post_init__(self):
        for name in ("block_v", "block_v_grad"):
            value = getattr(self, name)
            if value is not None and value not in (64, 128):
                raise ValueError(f"MosaicGpuConfig.{name} must be 64 or 128, got {value!r}")
        for name in (
            "chunks_per_program",
            "depth",
            "min_state_programs",
            "segment_programs",
            "min_segment_chunks",
        ):
            value = getattr(self, name)
            if value is not None and (
                not isinstance(value, int) or isinstance(value, bool) or value < 1
            ):
                raise ValueError(f"MosaicGpuConfig.{name} must be a positive int, got {value!r}")
        s = self.state_segments
        if not (
            s is None or s == "auto" or (isinstance(s, int) and not isinstance(s, bool) and s >= 1)
        ):
            raise ValueError(
                f'MosaicGpuConfig.state_segments must be "auto" or a positive int, got {s!r}'
            )


@dataclasses.dataclass(frozen=True)
class TritonStepConfig:
    """``pallas_triton`` linear_attention_step: key / value block, warps, stages."""

    block_k: int | None = None
    block_v: int | None = None
    num_warps: int | None = None
    num_stages: int | None = None


@dataclasses.dataclass(frozen=True)
class TpuConfig:
    """``pallas_tpu`` linear_attention: the per-channel diagonal sub-block (dividing the
    chunk; a multiple of 16 for 16-bit inputs, of 8 for float32) and the chunks per grid step
    (a multiple of 8 unless the sequence fits in one step; None: about 1024 tokens)."""

    sub_chunk: int | None = None
    chunks_per_step: int | None = None


@dataclasses.dataclass(frozen=True)
class TpuStepConfig:
    """``pallas_tpu`` linear_attention_step: the most state bytes one grid step holds (its
    heads are the most that fit)."""

    state_bytes_per_step: int | None = None


_HOPPER = TritonConfig(
    block_k=64,
    block_v=64,
    state_block=64,
    min_state_programs=264,  # two per SM of an H100 / H200
    sub_chunk=16,
    state_dtype="input",
    split_scores=True,
    mma=None,
    state_mma=None,
    num_warps=PerKernel(state=4, dstate=4, output=4, dv=4, dqk=4),
    num_stages=PerKernel(state=3, dstate=3, output=2, dv=2, dqk=2),
    state_segments="auto",
    segment_programs=528,  # four per SM
    min_segment_chunks=8,
    save_states=False,  # the backward recomputes the states (no residuals beyond the inputs)
)
# Per-channel decays spend most of their time on the exponentials of the [L, L, block_k]
# diagonal blocks; a value block covering V (up to 128) computes them once per chunk
# instead of once per value block.
_HOPPER_CHANNEL = tune.merge(
    _HOPPER, TritonConfig(block_v=128, num_warps=PerKernel(output=8, dv=8, dqk=8))
)
_HOPPER_ROWS = {"none": _HOPPER, "scalar": _HOPPER, "channel": _HOPPER_CHANNEL}

# generation -> decay kind -> TritonConfig. Hopper is the measured target; the others start
# from its rows (not measured).
TRITON = {
    "hopper": _HOPPER_ROWS,
    "blackwell": _HOPPER_ROWS,
    "ampere": _HOPPER_ROWS,
    "ada": _HOPPER_ROWS,
}
# H100 / H200: 132 SMs, 227 KB of shared memory per SM.
_MOSAIC_GPU_HOPPER = MosaicGpuConfig(
    block_v=128,
    block_v_grad=64,
    chunks_per_program=4,
    depth=2,
    split_scores=True,
    state_segments="auto",
    min_state_programs=128,
    segment_programs=264,
    min_segment_chunks=8,
    detect_races=False,
    save_states=False,  # the backward recomputes the states (no residuals beyond the inputs)
)
# generation -> decay kind -> MosaicGpuConfig (wgmma kernels: Hopper only).
MOSAIC_GPU = {
    "hopper": {
        "none": _MOSAIC_GPU_HOPPER,
        "scalar": _MOSAIC_GPU_HOPPER,
        "channel": _MOSAIC_GPU_HOPPER,
    }
}
# Where auto dispatch on a GPU tries the Mosaic GPU engine before pallas_triton:
# generation -> decay kind -> {(key dim, value dim): the longest sequence measured}, where it
# measured faster, forward and forward + backward (BENCHMARKS.md, "Mosaic GPU engine");
# elsewhere auto passes it over. H100 and H200, [8, 4096, 16, 128] bf16, scalar decay:
# 0.599 / 1.55 ms against 0.672 / 1.80 ms (H100), 0.461 / 1.29 against 0.562 / 1.61 (H200).
MOSAIC_GPU_AUTO: dict[str, dict[str, dict[tuple[int, int], int]]] = {
    "hopper": {"scalar": {(128, 128): 4096}}
}
# The JAX releases whose Mosaic GPU lowering the engine was compiled, tested and measured
# with on a GPU (the API is experimental and changes between releases); with another
# release auto dispatch keeps pallas_triton, and the engine is asked for by name.
MOSAIC_GPU_AUTO_JAX = ("0.11.",)
TRITON_STEP = TritonStepConfig(block_k=64, block_v=64, num_warps=4, num_stages=1)
TPU = TpuConfig(sub_chunk=16, chunks_per_step=None)
TPU_STEP = TpuStepConfig(state_bytes_per_step=1 << 20)

# The autotuner's search for the Triton chunk kernels (forward + backward).
SEARCH = {
    ("linear_attention", "pallas_triton"): (
        Axis("block_v", [32, 64, 128], backward=True),
        Axis("block_k", [32, 64], backward=True),
        Axis("state_segments", [1, "auto"], backward=True),
        Axis("split_scores", [True, False], backward=True),
        Axis(
            "num_warps",
            [PerKernel(output=4, dv=4, dqk=4), PerKernel(output=8, dv=8, dqk=8)],
            backward=True,
        ),
    ),
    # (A third pipeline stage, or value blocks of 128 in the gradient kernels, exceed the
    # 227 KB of shared memory at D = 128.)
    ("linear_attention", "pallas_mosaic_gpu"): (
        Axis("block_v", [64, 128], backward=True),
        Axis("chunks_per_program", [2, 4, 8, 16], backward=True),
        Axis("state_segments", [1, "auto"], backward=True),
        Axis("split_scores", [True, False], backward=True),
        Axis("depth", [1, 2], backward=True),
    ),
    ("linear_attention_step", "pallas_triton"): (
        Axis("block_v", [32, 64, 128]),
        Axis("num_warps", [1, 2, 4, 8]),
    ),
}


def triton_config(
    config: TritonConfig | None, decay: str, *, interpret: bool, device_kind: str | None = None
) -> TritonConfig:
    """The ``TritonConfig`` a chunked call with decay kind ``decay`` runs with."""
    rows = TRITON[generation(device_kind or current_device_kind())]
    return tune.resolve(
        "linear_attention", "pallas_triton", decay, rows[decay], config, interpret=interpret
    )


def mosaic_gpu_config(
    config: MosaicGpuConfig | None,
    decay: str,
    *,
    interpret: bool,
    device_kind: str | None = None,
) -> MosaicGpuConfig:
    """The ``MosaicGpuConfig`` a chunked call with decay kind ``decay`` runs with; raises
    NotImplementedError on a GPU generation without wgmma kernels (not in interpret mode,
    where the Hopper rows apply)."""
    gen = "hopper" if interpret else generation(device_kind or current_device_kind())
    if gen not in MOSAIC_GPU:
        raise NotImplementedError(
            "pallas_mosaic_gpu linear_attention is built for Hopper (sm90 wgmma); this GPU "
            f"is {gen} ({device_kind or current_device_kind()})"
        )
    return tune.resolve(
        "linear_attention",
        "pallas_mosaic_gpu",
        decay,
        MOSAIC_GPU[gen][decay],
        config,
        interpret=interpret,
    )


def mosaic_gpu_auto_skip(q, k, v, g, **_) -> str | None:
    """Why auto dispatch passes the Mosaic GPU engine over for these arguments (a
    ``dispatch.Op.auto_skip``), or None where ``MOSAIC_GPU_AUTO`` prefers it."""
    if not jax.__version__.startswith(MOSAIC_GPU_AUTO_JAX):
        return (
            f"not preferred by auto with jax {jax.__version__} (measured with "
            f"{', '.join(v + 'x' for v in MOSAIC_GPU_AUTO_JAX)}: MOSAIC_GPU_AUTO_JAX)"
        )
    gen = generation(current_device_kind())
    decay = "none" if g is None else ("scalar" if g.ndim == 3 else "channel")
    dims, length = (q.shape[-1], v.shape[-1]), q.shape[1]
    longest = MOSAIC_GPU_AUTO.get(gen, {}).get(decay, {}).get(dims)
    if longest is not None and length <= longest:
        return None
    return (
        f"not preferred by auto for {decay} decay at key/value dims {dims}, T = {length} on "
        f"{gen} (MOSAIC_GPU_AUTO: where it measured faster than pallas_triton)"
    )


def triton_step_config(config: TritonStepConfig | None, *, interpret: bool) -> TritonStepConfig:
    """The ``TritonStepConfig`` a decoding step runs with."""
    return tune.resolve(
        "linear_attention_step",
        "pallas_triton",
        DEFAULT_KEY,
        TRITON_STEP,
        config,
        interpret=interpret,
    )


def tpu_config(config: TpuConfig | None, *, interpret: bool) -> TpuConfig:
    """The ``TpuConfig`` a chunked call on a TPU runs with."""
    return tune.resolve(
        "linear_attention", "pallas_tpu", DEFAULT_KEY, TPU, config, interpret=interpret
    )


def tpu_step_config(config: TpuStepConfig | None, *, interpret: bool) -> TpuStepConfig:
    """The ``TpuStepConfig`` a decoding step on a TPU runs with."""
    return tune.resolve(
        "linear_attention_step", "pallas_tpu", DEFAULT_KEY, TPU_STEP, config, interpret=interpret
    )
