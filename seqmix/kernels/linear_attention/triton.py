"""Chunked gated linear attention in Pallas Triton (GPU), forward and backward.

``S_t = exp(g_t) * S_{t-1} + k_t v_t^T``, ``o_t = scale * q_t^T S_t`` (see ``reference.py``
for the argument conventions) in the three stages of the chunked form:

  1+2. ``triton_state.chunk_states``: one sequential pass over chunks per (batch, v head,
       key block, value block) keeping the state in registers; writes the state entering
       every chunk (stages 1 and 2 fused, as flash-linear-attention's ``chunk_fwd_h``);
  3.   ``triton_output.chunk_output``: every chunk's output in parallel (state term plus
       the causal intra-chunk attention with decay ``exp(b_t - b_s)``).

``TUNING["state_segments"] = "auto"`` (the default since the H200 run of 2026-11-28)
splits the state pass in two levels where the grid is small (below); ``fused_forward``
(``triton_fused``: stages 1-3 in one kernel, no chunk states in HBM) stays opt-in: it was
measured slower.

The backward (``jax.custom_vjp``) recomputes the chunk states, runs the reverse pass over
chunks for the state gradients (``triton_state.chunk_state_grads``) and then the per-chunk
gradient kernels (``triton_grad.chunk_dv`` and ``chunk_dqk``: dq, dk and the log-decay
gradient); d initial_state is the reverse pass's last state gradient.

q/k heads are never repeated: a v head ``h`` reads q/k head ``h // (Hv // Hqk)`` through the
block index maps; dq and dk are computed per v head and summed over each group.

Two-level state passes (``state_segments``: "auto", the default; an int ``P``; None = one pass)
-----------------------------------------------------------------------------------------------
The state pass is one dependent chain of ``n = T / C`` steps per (batch, v head, state
block); at small batch there are too few chains to fill the GPU (``B = 1, H = 16``: 64
chains of 64x64 blocks, 256 after halving to 32x32, against 132 SMs that each keep ~4
resident) and each is ``n`` steps long. The two-level pass splits the chunks into ``P``
segments of ``segment_chunks``:

  1. every (segment, batch, head, state block) walks its chunks from a zero state, storing
     the LOCAL state entering each chunk, the factor ``f_c`` (product of the chunk decays
     from the segment start, ``[K]`` per channel; 0 once the run changes: segment resets
     stay exact), its local end state and its total decay ``a_p``;
  2. ``combine_segments``: ``entering_{p+1} = a_p * entering_p + end_p`` (``P`` steps,
     float32), whose last value is the final state;
  3. the output kernel completes each state tile in registers, ``S_c = local_c + f_c *
     entering_p``, so no pass rewrites the stored states. The backward does the same in
     reverse for ``dS`` (factor: decays from the chunk's end to the segment's end) and
     ``chunk_dv`` / ``chunk_dqk`` complete both ``S_c`` and ``dS_{c+1}``.

"auto" keeps one pass while the single-level grid already has ``min_state_programs`` (2 per
SM) programs, else takes ``P = ceil(segment_programs / programs)`` (4 per SM), at least
``min_segment_chunks`` chunks per segment, and never halves the 64x64 state blocks.

Measured on the H200 (2026-11-28, forward, bf16, H = 16, D = 128, scalar decay; the same
run timed flash-linear-attention's ``chunk_simple_gla``): [8, 4096] 0.479 ms (single pass
0.478, FLA 0.470); [2, 16384] 0.624 ms (single pass 0.763, FLA 0.503); [1, 65536] 1.297 ms
(single pass 1.795, FLA 1.459). Forward+backward [2, 16384] 2.26 ms (single pass 2.66). The
FLA tiling row (``block_v`` 128, one bf16 score matmul, 8 warps) was slower (0.632 ms at
[8, 4096]) and the fused forward too (0.637 / 0.908 / 1.985 ms): both stay opt-in. The
predictions below were written before that run and missed: the remaining gap is not the
state pass's chain length alone.

Expected effect, written before the run (H200: 132 SMs, copy ceiling 4.27 TB/s; bf16, H = 16, D = 128, C = 64; to
be checked against BENCHMARKS.md). Per token and head the engine moves ~2.5 KB through HBM:
the state pass reads k, v (512 B) and writes the bf16 states (32 KB per chunk = 512 B);
the output kernel reads q, k, v (768 B) and the states (512 B) and writes o (256 B). That is
9.6 ns per token (all 16 heads) at the copy ceiling; FLA's ``chunk_simple_gla`` also stores
its chunk states (the same traffic if they are bf16) and runs at 12.6 ns (76%), seqmix at
14.5 ns at [8, 4096] (66%).
  * [8, 4096]: 512 chains of 64 steps already, "auto" keeps P = 1: same time (0.476 ms).
  * [2, 16384]: P = 5 (640 chains of <= 52 chunks, from 512 chains of 256 with 32x32
    blocks); [1, 65536]: P = 9 (576 chains of <= 114 chunks, from 256 chains of 1024).
    At ~1 us per dependent step (what 1024 steps in ~1.1 ms at [1, 65536] imply) the chain
    is ~0.12 ms at 64k, below the state pass's own bandwidth floor (1 KB per token-head:
    0.25 ms), so the pass becomes bandwidth bound and time per token should fall back to the
    [8, 4096] figure plus the combine (P dependent steps, ~10-20 us) and the reads of the
    segment states (P * 32 KB per head in bf16; every chunk of a segment reads the same
    tiles, so they come from L2): predicted forward ~0.50 ms at [2, 16384] (from 0.764;
    FLA 0.460) and ~0.95-1.0 ms at [1, 65536] (from 1.80; FLA 1.19), i.e. 14.5 -> ~15 ns
    per token, flat within 15%; forward+backward at [2, 16384] ~1.9-2.0 ms (from 2.64).
    If instead the time does not move, the state pass was not the bottleneck at small batch
    (look at the output kernel's time with a profiler before tuning further).
  * At [8, 4096] the remaining 1.15x to FLA is in the output kernel: with ``block_v`` 64
    it computes q k^T twice per chunk and every score matmul twice (``split_scores``):
    3.1 M MACs per chunk and head against FLA's 2.1 M (q k^T once, one bf16 score matmul).
    ``{"block_v": 128, "split_scores": False, "num_warps": {"output": 8, "dv": 8,
    "dqk": 8}}`` matches FLA's tiling and precision (scores rounded to bf16, ~8 bits);
    predicted 0.40 +- 0.03 ms at [8, 4096] if the output kernel is compute/latency bound,
    no change if it is bandwidth bound. bf16 state storage is already on: float32 states
    would add 1 KB per token-head (+40% traffic); ``chunk_size`` 128 halves the state
    traffic (-20% bytes) for 1.4x the intra-chunk MACs (to be measured, not a TUNING key).
  * The stored states are 1 KB of the 2.5 KB per token-head: ``{"fused_forward": True}``
    (``triton_fused``) keeps them in registers, so the forward moves 1 KB (one pass) or
    1.5 KB (two-level: the store-free state pass reads k, v again): 3.8 ns per token at the
    copy ceiling at [8, 4096], 5.7 ns at [1, 65536]. Its chain carries the four matmuls of a
    chunk (2.1 M MACs per 64x128x64 step and value block): 256 programs of 64 steps at
    [8, 4096], 288 of <= 114 at [1, 65536] (P = 9). At ~1.5-3 us per step, predicted
    forward 0.15-0.25 ms at [8, 4096] and 0.35-0.5 ms at [1, 65536] (from 0.476 / 1.80;
    FLA 0.414 / 1.19); if the step is slower than ~6 us (register spills: 8 warps hold the
    [128, 64] float32 state, the [64, 64] scores and the output tile) it loses to the stored
    path at [8, 4096]. Scalar and no decay are its target; per channel it works but keeps
    the [K, 128] state of that decay's ``block_v`` in registers. The backward is unchanged.
    (FLA has the same idea as ``fla.ops.common.fused_chunk``; its default is the stored
    form.)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from seqmix.kernels import dispatch
from seqmix.kernels.linear_attention import (
    triton_fused,
    triton_grad,
    triton_output,
    triton_state,
)
from seqmix.kernels.linear_attention.triton_common import Plan

# Tuning table (H200 defaults; the lead's benchmark sweeps them). ``config=`` overrides any
# entry for one call.
TUNING = {
    # Output and gradient kernels: the key / value blocks (<= 64 keeps tiles in registers).
    "block_k": 64,
    "block_v": 64,
    # State passes: blocks of the state per program; halved (down to 32) while fewer than
    # ``min_state_programs`` programs would run, since each walks all chunks in order.
    "state_block": 64,
    "min_state_programs": 264,  # two per SM of an H200
    # Sub-chunk of per-channel decays (the [L, L, block_k] diagonal blocks).
    "sub_chunk": 16,
    # Chunk states in HBM: "input" stores them in bf16 for bf16 inputs (the matmul that
    # reads them takes bf16 operands anyway), float32 otherwise; "float32" always.
    "state_dtype": "input",
    # Score matrices (decayed q k^T and its gradient) enter their matmuls as two bf16/fp16
    # parts (hi + lo): one more small matmul each, ~16 mantissa bits instead of 8.
    "split_scores": True,
    # Matmul operand dtypes: None derives them from the input dtype (bf16/fp16 operands with
    # float32 accumulation; float32 inputs use exact IEEE float32 matmuls). "float32" here
    # makes every matmul exact at a large speed cost (a debugging aid).
    "mma": None,
    "state_mma": None,
    "num_warps": {"state": 4, "dstate": 4, "output": 4, "dv": 4, "dqk": 4, "fused": 8},
    "num_stages": {"state": 3, "dstate": 3, "output": 2, "dv": 2, "dqk": 2, "fused": 2},
    # Two-level state passes (see the module docstring): None = one sequential pass over
    # all chunks; an int P = P segments; "auto" (measured faster on the H200 at 16k and 64k,
    # equal at 4k) = P from the grid: P = ceil(segment_programs / programs) when fewer than
    # min_state_programs programs would run, with at least min_segment_chunks chunks per
    # segment.
    "state_segments": "auto",
    "segment_programs": 528,  # four per SM of an H200
    "min_segment_chunks": 8,
    # Forward with the state pass and the output in one kernel (``triton_fused``): no chunk
    # states in HBM; with state_segments, a state pass without stores runs first. Off: slower
    # than the stored form on the H200 at every measured shape (module docstring).
    "fused_forward": False,
}

# Per decay kind, entries that replace TUNING's. Per-channel decays spend most of their time
# on the exponentials of the [L, L, block_k] diagonal blocks; a value block covering V (up
# to 128) computes them once per chunk instead of once per value block.
TUNING_BY_DECAY = {
    "channel": {
        "block_v": 128,
        "num_warps": {"state": 4, "dstate": 4, "output": 8, "dv": 8, "dqk": 8},
    },
}

_MMA = {"bfloat16": "bfloat16", "float16": "float16", "float32": "float32"}
_STATE_MMA = {"bfloat16": "bfloat16", "float16": "tfloat32", "float32": "float32"}


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def make_plan(q, v, g, initial_state, runs, *, scale, chunk_size, config=None) -> Plan:
    """Resolves blocks, padding and dtypes for one call; raises NotImplementedError for
    arguments the kernels cannot serve."""
    B, T, Hqk, K = q.shape
    Hv, V = v.shape[2], v.shape[3]
    decay = "none" if g is None else ("scalar" if g.ndim == 3 else "channel")
    cfg = dict(TUNING)
    for layer in (TUNING_BY_DECAY.get(decay, {}), config or {}):
        for key, value in layer.items():  # per-kernel dicts merge key by key
            cfg[key] = {**cfg[key], **value} if isinstance(cfg.get(key), dict) else value
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
    sub = min(cfg["sub_chunk"], C) if decay == "channel" else C
    if sub < 16 or C % sub or sub & (sub - 1):
        raise NotImplementedError(
            f"sub_chunk must be a power of two >= 16 dividing chunk_size, got {sub}"
        )

    def block(want, dim):
        return max(16, min(want, _pow2_at_least(dim)))

    bk, bv = block(cfg["block_k"], K), block(cfg["block_v"], V)
    sbk, sbv = block(cfg["state_block"], K), block(cfg["state_block"], V)
    chunks = _round_up(T, C) // C
    segments = _segment_count(cfg, B * Hv * -(-K // sbk) * -(-V // sbv), chunks)
    segment_chunks = -(-chunks // segments)
    segments = -(-chunks // segment_chunks)  # no empty segment
    while (
        segments == 1
        and B * Hv * -(-K // sbk) * -(-V // sbv) < cfg["min_state_programs"]
        and max(sbk, sbv) > 32
    ):
        if sbv >= sbk:
            sbv //= 2
        else:
            sbk //= 2
    half = dtype in ("bfloat16",) and cfg["state_dtype"] == "input"
    return Plan(
        batch=B,
        time=_round_up(T, C),
        qk_heads=Hqk,
        v_heads=Hv,
        key_dim=_round_up(K, max(bk, sbk)),
        value_dim=_round_up(V, max(bv, sbv)),
        chunk=C,
        sub_chunk=sub,
        decay=decay,
        has_runs=runs is not None,
        has_initial=initial_state is not None,
        scale=float(scale),
        dtype=dtype,
        mma=cfg["mma"] or _MMA[dtype],
        state_mma=cfg["state_mma"] or _STATE_MMA[dtype],
        state_dtype="bfloat16" if half else "float32",
        block_k=bk,
        block_v=bv,
        state_block_k=sbk,
        state_block_v=sbv,
        split_scores=bool(cfg["split_scores"]),
        warps=tuple(sorted(cfg["num_warps"].items())),
        stages=tuple(sorted(cfg["num_stages"].items())),
        interpret=dispatch.interpret_mode(),
        segments=segments,
        segment_chunks=segment_chunks,
        fused=bool(cfg["fused_forward"]),
    )


def _segment_count(cfg: dict, programs: int, chunks: int) -> int:
    """Segments of the two-level state pass (1: one sequential pass); see ``TUNING``."""
    want = cfg["state_segments"]
    if want is None or want is False:
        return 1
    if want == "auto":
        if programs >= cfg["min_state_programs"]:
            return 1
        wanted = -(-cfg["segment_programs"] // programs)
        return max(1, min(wanted, chunks // max(1, cfg["min_segment_chunks"])))
    if isinstance(want, int) and not isinstance(want, bool) and want >= 1:
        return min(want, chunks)
    raise ValueError(
        f'config["state_segments"] must be None, a positive int or "auto", got {want!r}'
    )


def _pad(x, sizes, value=0):
    """Pads ``x`` at the end of the axes in ``sizes`` ({axis: size}) with zeros or, for
    ``value="edge"``, with the last entry."""
    if x is None:
        return None
    pads = [(0, 0)] * x.ndim
    for axis, size in sizes.items():
        pads[axis] = (0, size - x.shape[axis])
    if all(p == (0, 0) for p in pads):
        return x
    if value == "edge":
        return jnp.pad(x, pads, mode="edge")
    return jnp.pad(x, pads)


def linear_attention(q, k, v, g, *, scale, initial_state, runs, chunk_size=64, config=None):
    """``(o [B, T, Hv, V] in q's dtype, final_state [B, Hv, K, V] float32)``.

    q, k ``[B, T, Hqk, K]``; v ``[B, T, Hv, V]``; g None, ``[B, T, Hv]`` or
    ``[B, T, Hv, K]`` float32 (<= 0); initial_state float32 ``[B, Hv, K, V]`` or None; runs
    None or ``[B, T]`` int32 non-decreasing (the state resets where it changes).
    ``config`` overrides entries of ``TUNING``. Differentiable in q, k, v, g, initial_state.
    """
    _B, T, _, K = q.shape
    V = v.shape[3]
    plan = make_plan(
        q, v, g, initial_state, runs, scale=scale, chunk_size=chunk_size, config=config
    )
    Tp, Kp, Vp = plan.time, plan.key_dim, plan.value_dim
    q = _pad(q, {1: Tp, 3: Kp})
    k = _pad(k, {1: Tp, 3: Kp})
    v = _pad(v, {1: Tp, 3: Vp})
    if g is not None:
        g = _pad(g.astype(jnp.float32), {1: Tp} if g.ndim == 3 else {1: Tp, 3: Kp})
    if runs is not None:
        runs = _pad(runs.astype(jnp.int32), {1: Tp}, "edge")
    if initial_state is not None:
        initial_state = _pad(initial_state.astype(jnp.float32), {2: Kp, 3: Vp})
    o, final = _chunked(plan, q, k, v, g, initial_state, runs)
    return o[:, :T, :, :V], final[:, :, :K, :V]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _chunked(plan: Plan, q, k, v, g, initial_state, runs):
    if plan.fused and plan.segmented:
        _, final, segments = triton_state.chunk_states(
            plan, k, v, g, runs, initial_state, store_states=False
        )
        return triton_fused.fused_output(plan, q, k, v, g, runs, segments[0])[0], final
    if plan.fused:
        return triton_fused.fused_output(plan, q, k, v, g, runs, initial_state)
    states, final, segments = triton_state.chunk_states(plan, k, v, g, runs, initial_state)
    return triton_output.chunk_output(plan, q, k, v, g, runs, states, segments), final


def _chunked_fwd(plan, q, k, v, g, initial_state, runs):
    return _chunked(plan, q, k, v, g, initial_state, runs), (q, k, v, g, initial_state, runs)


def _chunked_bwd(plan, residuals, cotangents):
    q, k, v, g, initial_state, runs = residuals
    do, dfinal = cotangents
    do = do.astype(q.dtype)
    states, _, segments = triton_state.chunk_states(plan, k, v, g, runs, initial_state)
    dstates, dinit, dsegments = triton_state.chunk_state_grads(
        plan,
        q,
        do,
        g,
        runs,
        dfinal.astype(jnp.float32),
        decays=None if segments is None else segments[2],
    )
    dv = triton_grad.chunk_dv(plan, q, k, g, runs, do, dstates, dsegments)
    G = plan.groups
    grad_dtype = q.dtype if G == 1 else jnp.float32
    dq, dk, dg = triton_grad.chunk_dqk(
        plan, q, k, v, g, runs, do, states, dstates, grad_dtype, segments, dsegments
    )
    if G > 1:
        B, T, _, K = q.shape
        dq = dq.reshape(B, T, plan.qk_heads, G, K).sum(3).astype(q.dtype)
        dk = dk.reshape(B, T, plan.qk_heads, G, K).sum(3).astype(k.dtype)
    if dg is not None and g.ndim == 3:
        dg = dg.sum(0) if dg.shape[0] > 1 else dg[0]
    return (dq, dk, dv, dg, dinit if initial_state is not None else None, None)


_chunked.defvjp(_chunked_fwd, _chunked_bwd)
