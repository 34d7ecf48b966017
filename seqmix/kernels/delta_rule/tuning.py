"""Tuning of the gated delta rule kernels: the Configs of the Pallas backends and their
tables (see ``seqmix.kernels.tune`` for how a call's Config is resolved).

The Triton chunk kernels' table is keyed by GPU generation and decay kind (the tuning key:
``"none"`` for the plain delta rule, ``"scalar"`` for a log decay per head); the decoding
step's and the TPU kernels' tables have one row (key ``"default"``). The rows start from
the linear-attention engine's Hopper row (the output and dq/dk kernels are that engine's);
they are not measured for the delta rule yet.
"""

from __future__ import annotations

import dataclasses

from seqmix.kernels import tune
from seqmix.kernels.common import current_device_kind, generation
from seqmix.kernels.tune import Axis

DEFAULT_KEY = "default"


@dataclasses.dataclass(frozen=True)
class PerKernel:
    """One number per Triton kernel of the chunked form (None: the table's): the WY
    transform, the state pass, the output kernel, the reverse state pass, the dq/dk kernel
    and the WY transform's backward."""

    wy: int | None = None
    state: int | None = None
    output: int | None = None
    dstate: int | None = None
    dqk: int | None = None
    dwy: int | None = None


@dataclasses.dataclass(frozen=True)
class TritonConfig:
    """``pallas_triton`` gated_delta_rule (None: the table's).

    Attributes:
      block_k, block_v: key / value block of the output and dq/dk kernels (the linear-
        attention engine's, which run on the pseudo-values).
      state_block_v: value block of the state passes; each program holds the whole key
        dimension of its ``[K, block]`` state, since ``v_new = U - W S`` sums over it.
      state_dtype: chunk states in HBM: ``"input"`` (bf16 for bf16 inputs) or ``"float32"``.
      split_scores: score matrices and the UT inverse enter their matmuls as two half-
        precision parts (hi + lo) for half-precision inputs.
      mma, state_mma: matmul operand dtypes; None: derived from the input dtype (float32
        inputs use exact IEEE float32 matmuls).
      inverse_block: the UT inverse ``(I + A)^{-1}`` of each chunk: 0 by elimination, one
        column per step (``C`` steps of masked reductions); 16 (a power of two below the
        chunk) by blocks: the diagonal blocks' elimination at once (16 steps), then block
        forward substitution by matmuls.
      wy_backward: ``"fused"``, the WY transform's backward in one kernel per chunk, or
        ``"split"``, two kernels (the value side: dv and ``du (beta v)^T``; the key side:
        dk, d log_decay), each holding about half the tiles of the fused one at the cost of
        the UT inverse twice and a ``[C, C]`` block per chunk through memory. Both use the
        ``dwy`` warps and stages.
      save_states: the forward's ``w``, chunk states and pseudo-values ``v_new`` are kept
        for the backward, which otherwise recomputes them (the WY transform and the state
        pass a second time). Memory per call: ``w`` and ``v_new`` as large as k and v, the
        states ``[B, T / chunk, H, K, V]`` in the state dtype.
      num_warps, num_stages: per kernel (``PerKernel``).
    """

    block_k: int | None = None
    block_v: int | None = None
    state_block_v: int | None = None
    state_dtype: str | None = None
    split_scores: bool | None = None
    mma: str | None = None
    state_mma: str | None = None
    num_warps: PerKernel | None = None
    num_stages: PerKernel | None = None
    inverse_block: int | None = None
    wy_backward: str | None = None
    save_states: bool | None = None


@dataclasses.dataclass(frozen=True)
class TritonStepConfig:
    """``pallas_triton`` gated_delta_rule_step: value block (the key dimension is whole per
    program: the prediction ``k^T S`` sums over it), warps, stages."""

    block_v: int | None = None
    num_warps: int | None = None
    num_stages: int | None = None


@dataclasses.dataclass(frozen=True)
class TpuConfig:
    """``pallas_tpu`` gated_delta_rule: chunks per grid step of the WY kernels (they walk
    them in a loop; a block of ``chunks_per_step * chunk`` tokens)."""

    chunks_per_step: int | None = None


@dataclasses.dataclass(frozen=True)
class TpuStepConfig:
    """``pallas_tpu`` gated_delta_rule_step: the most state bytes one grid step holds."""

    state_bytes_per_step: int | None = None


_HOPPER = TritonConfig(
    block_k=64,
    block_v=64,
    state_block_v=32,
    state_dtype="input",
    split_scores=True,
    mma=None,
    state_mma=None,
    num_warps=PerKernel(wy=4, state=4, output=4, dstate=4, dqk=4, dwy=4),
    num_stages=PerKernel(wy=2, state=2, output=2, dstate=2, dqk=2, dwy=2),
    # H100, [8, 4096, 16, 128] bf16: forward 1.86 ms by blocks of 16 against 2.53 ms by
    # elimination and 2.07 ms by blocks of 32; forward + backward 11.1 against 11.8 ms.
    inverse_block=16,
    wy_backward="fused",
    # the backward recomputes w, the states and v_new (no residuals beyond the inputs)
    save_states=False,
)
_HOPPER_ROWS = {"none": _HOPPER, "scalar": _HOPPER}

# generation -> decay kind -> TritonConfig (not measured; every generation starts from the
# same row).
TRITON = {
    "hopper": _HOPPER_ROWS,
    "blackwell": _HOPPER_ROWS,
    "ampere": _HOPPER_ROWS,
    "ada": _HOPPER_ROWS,
}
TRITON_STEP = TritonStepConfig(block_v=32, num_warps=4, num_stages=1)
TPU = TpuConfig(chunks_per_step=1)
TPU_STEP = TpuStepConfig(state_bytes_per_step=1 << 20)

# The autotuner's search for the Triton kernels (forward + backward).
SEARCH = {
    ("gated_delta_rule", "pallas_triton"): (
        Axis("state_block_v", [16, 32, 64], backward=True),
        Axis("block_v", [32, 64, 128], backward=True),
        Axis("block_k", [32, 64], backward=True),
        Axis("split_scores", [True, False], backward=True),
        Axis("inverse_block", [0, 16, 32], backward=True),
        Axis("wy_backward", ["fused", "split"], backward=True),
        Axis(
            "num_warps",
            [
                PerKernel(wy=4, output=4, dqk=4, dwy=4),
                PerKernel(wy=8, output=8, dqk=8, dwy=8),
            ],
            backward=True,
        ),
    ),
    ("gated_delta_rule_step", "pallas_triton"): (
        Axis("block_v", [16, 32, 64, 128]),
        Axis("num_warps", [1, 2, 4, 8]),
    ),
}


def triton_config(
    config: TritonConfig | None, decay: str, *, interpret: bool, device_kind: str | None = None
) -> TritonConfig:
    """The ``TritonConfig`` a chunked call with decay kind ``decay`` runs with."""
    rows = TRITON[generation(device_kind or current_device_kind())]
    return tune.resolve(
        "gated_delta_rule", "pallas_triton", decay, rows[decay], config, interpret=interpret
    )


def triton_step_config(config: TritonStepConfig | None, *, interpret: bool) -> TritonStepConfig:
    """The ``TritonStepConfig`` a decoding step runs with."""
    return tune.resolve(
        "gated_delta_rule_step",
        "pallas_triton",
        DEFAULT_KEY,
        TRITON_STEP,
        config,
        interpret=interpret,
    )


def tpu_config(config: TpuConfig | None, *, interpret: bool) -> TpuConfig:
    """The ``TpuConfig`` a chunked call on a TPU runs with."""
    return tune.resolve(
        "gated_delta_rule", "pallas_tpu", DEFAULT_KEY, TPU, config, interpret=interpret
    )


def tpu_step_config(config: TpuStepConfig | None, *, interpret: bool) -> TpuStepConfig:
    """The ``TpuStepConfig`` a decoding step on a TPU runs with."""
    return tune.resolve(
        "gated_delta_rule_step", "pallas_tpu", DEFAULT_KEY, TPU_STEP, config, interpret=interpret
    )
