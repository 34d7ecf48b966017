"""The static plan of one chunked gated-delta-rule call (Pallas Triton): the linear-attention
engine's ``Plan`` (its output and dq/dk kernels run on it unchanged) with the delta rule's
blocks, dtypes and per-kernel launch parameters resolved from ``tuning.TritonConfig``.

The delta rule's state passes hold the whole (padded) key dimension of their state block
(``state_block_k = key_dim``) because ``v_new = U - W S`` sums over it, so the value
dimension alone is blocked (``state_block_v``), and there is one sequential pass (no
two-level segments: the chunk-to-chunk map ``S -> exp(b) (S - K^T W S) + ...`` is a
``[K, K]`` matrix, not a scalar, so segments would not combine cheaply).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from seqmix.kernels import dispatch
from seqmix.kernels.common import pow2_at_least, round_up
from seqmix.kernels.delta_rule import tuning
from seqmix.kernels.linear_attention.triton.plan import Plan

_MMA = {"bfloat16": "bfloat16", "float16": "float16", "float32": "float32"}
_STATE_MMA = {"bfloat16": "bfloat16", "float16": "tfloat32", "float32": "float32"}
_WY_MMA = {"bfloat16": "tfloat32", "float16": "tfloat32", "float32": "float32"}


@dataclasses.dataclass(frozen=True)
class DeltaPlan(Plan):
    """``Plan`` plus ``wy_mma``: the operand dtype of the matmuls on float32 intermediates
    of the WY transform (the inverse ``M``, ``w``, ``u`` and their gradients),
    ``inverse_block``: the UT inverse by elimination (0) or by blocks of that many rows, and
    ``split_wy_backward``: the WY backward as two kernels (value side, key side).
    (``save_states``, the engine's: here the forward keeps w, the states and v_new.)"""

    wy_mma: str = "float32"
    inverse_block: int = 0
    split_wy_backward: bool = False


def make_plan(
    q, v, g, initial_state, runs, *, scale, chunk_size, config: tuning.TritonConfig | None
) -> DeltaPlan:
    """Resolves blocks, padding and dtypes for one call; raises NotImplementedError for
    arguments the kernels cannot serve."""
    B, T, Hqk, K = q.shape
    Hv, V = v.shape[2], v.shape[3]
    decay = "none" if g is None else "scalar"
    cfg = tuning.triton_config(config, decay, interpret=dispatch.interpret_mode())
    dtype = jnp.dtype(q.dtype).name
    if dtype not in _MMA:
        raise NotImplementedError(
            f"pallas_triton gated_delta_rule supports bfloat16, float16 and float32 inputs, "
            f"got {dtype}"
        )
    C = chunk_size
    if C < 16 or C & (C - 1):
        raise NotImplementedError(
            f"pallas_triton gated_delta_rule needs chunk_size a power of two >= 16 (the "
            f"matmul tiles of Triton), got {chunk_size}"
        )

    def block(want, dim):
        return max(16, min(want, pow2_at_least(dim)))

    bk, bv, sbv = block(cfg.block_k, K), block(cfg.block_v, V), block(cfg.state_block_v, V)
    ib = cfg.inverse_block or 0
    if ib and (ib < 16 or ib & (ib - 1)):
        raise ValueError(f"TritonConfig.inverse_block must be 0 or a power of two >= 16, got {ib}")
    if cfg.wy_backward not in (None, "fused", "split"):
        raise ValueError(
            f'TritonConfig.wy_backward must be "fused" or "split", got {cfg.wy_backward!r}'
        )
    Kp = round_up(K, bk)
    half = dtype == "bfloat16" and cfg.state_dtype == "input"
    return DeltaPlan(
        batch=B,
        time=round_up(T, C),
        qk_heads=Hqk,
        v_heads=Hv,
        key_dim=Kp,
        value_dim=round_up(V, max(bv, sbv)),
        chunk=C,
        sub_chunk=C,
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
        state_block_k=Kp,
        state_block_v=sbv,
        split_scores=bool(cfg.split_scores),
        warps=tuple(sorted(dataclasses.asdict(cfg.num_warps).items())),
        stages=tuple(sorted(dataclasses.asdict(cfg.num_stages).items())),
        interpret=dispatch.interpret_mode(),
        segments=1,
        segment_chunks=round_up(T, C) // C,
        wy_mma="float32"
        if _MMA[dtype] == "float32" and cfg.mma in (None, "float32")
        else _WY_MMA[dtype],
        inverse_block=ib if ib < C else 0,
        split_wy_backward=cfg.wy_backward == "split",
        save_states=bool(cfg.save_states),
    )
