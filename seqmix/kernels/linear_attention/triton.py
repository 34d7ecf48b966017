"""Chunked gated linear attention in Pallas Triton (GPU), forward and backward.

``S_t = exp(g_t) * S_{t-1} + k_t v_t^T``, ``o_t = scale * q_t^T S_t`` (see ``reference.py``
for the argument conventions) in the three stages of the chunked form:

  1+2. ``triton_state.chunk_states``: one sequential pass over chunks per (batch, v head,
       key block, value block) keeping the state in registers; writes the state entering
       every chunk (stages 1 and 2 fused, as flash-linear-attention's ``chunk_fwd_h``);
  3.   ``triton_output.chunk_output``: every chunk's output in parallel (state term plus
       the causal intra-chunk attention with decay ``exp(b_t - b_s)``).

The backward (``jax.custom_vjp``) recomputes the chunk states, runs the reverse pass over
chunks for the state gradients (``triton_state.chunk_state_grads``) and then the per-chunk
gradient kernels (``triton_grad.chunk_dv`` and ``chunk_dqk``: dq, dk and the log-decay
gradient); d initial_state is the reverse pass's last state gradient.

q/k heads are never repeated: a v head ``h`` reads q/k head ``h // (Hv // Hqk)`` through the
block index maps; dq and dk are computed per v head and summed over each group.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from seqmix.kernels import dispatch
from seqmix.kernels.linear_attention import triton_grad, triton_output, triton_state
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
    "num_warps": {"state": 4, "dstate": 4, "output": 4, "dv": 4, "dqk": 4},
    "num_stages": {"state": 3, "dstate": 3, "output": 2, "dv": 2, "dqk": 2},
}

# Per decay kind, entries that replace TUNING's. Per-channel decays spend most of their time
# on the exponentials of the [L, L, block_k] diagonal blocks; a value block covering V (up
# to 128) computes them once per chunk instead of once per value block.
TUNING_BY_DECAY = {
    "channel": {"block_v": 128,
                "num_warps": {"state": 4, "dstate": 4, "output": 8, "dv": 8, "dqk": 8}},
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
    cfg = {**TUNING, **TUNING_BY_DECAY.get(decay, {}), **(config or {})}
    dtype = jnp.dtype(q.dtype).name
    if dtype not in _MMA:
        raise NotImplementedError(
            f"pallas_triton linear_attention supports bfloat16, float16 and float32 inputs, "
            f"got {dtype}")
    C = chunk_size
    if C < 16 or C & (C - 1):
        raise NotImplementedError(
            f"pallas_triton linear_attention needs chunk_size a power of two >= 16 (the "
            f"matmul tiles of Triton), got {chunk_size}")
    sub = min(cfg["sub_chunk"], C) if decay == "channel" else C
    if sub < 16 or C % sub or sub & (sub - 1):
        raise NotImplementedError(f"sub_chunk must be a power of two >= 16 dividing "
                                  f"chunk_size, got {sub}")

    def block(want, dim):
        return max(16, min(want, _pow2_at_least(dim)))

    bk, bv = block(cfg["block_k"], K), block(cfg["block_v"], V)
    sbk, sbv = block(cfg["state_block"], K), block(cfg["state_block"], V)
    while (B * Hv * -(-K // sbk) * -(-V // sbv) < cfg["min_state_programs"]
           and max(sbk, sbv) > 32):
        if sbv >= sbk:
            sbv //= 2
        else:
            sbk //= 2
    half = dtype in ("bfloat16",) and cfg["state_dtype"] == "input"
    return Plan(
        batch=B, time=_round_up(T, C), qk_heads=Hqk, v_heads=Hv,
        key_dim=_round_up(K, max(bk, sbk)), value_dim=_round_up(V, max(bv, sbv)),
        chunk=C, sub_chunk=sub, decay=decay, has_runs=runs is not None,
        has_initial=initial_state is not None, scale=float(scale), dtype=dtype,
        mma=cfg["mma"] or _MMA[dtype], state_mma=cfg["state_mma"] or _STATE_MMA[dtype],
        state_dtype="bfloat16" if half else "float32",
        block_k=bk, block_v=bv, state_block_k=sbk, state_block_v=sbv,
        split_scores=bool(cfg["split_scores"]),
        warps=tuple(sorted(cfg["num_warps"].items())),
        stages=tuple(sorted(cfg["num_stages"].items())),
        interpret=dispatch.interpret_mode(),
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
    B, T, _, K = q.shape
    V = v.shape[3]
    plan = make_plan(q, v, g, initial_state, runs, scale=scale, chunk_size=chunk_size,
                     config=config)
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
    states, final = triton_state.chunk_states(plan, k, v, g, runs, initial_state)
    return triton_output.chunk_output(plan, q, k, v, g, runs, states), final


def _chunked_fwd(plan, q, k, v, g, initial_state, runs):
    return _chunked(plan, q, k, v, g, initial_state, runs), (q, k, v, g, initial_state, runs)


def _chunked_bwd(plan, residuals, cotangents):
    q, k, v, g, initial_state, runs = residuals
    do, dfinal = cotangents
    do = do.astype(q.dtype)
    states, _ = triton_state.chunk_states(plan, k, v, g, runs, initial_state)
    dstates, dinit = triton_state.chunk_state_grads(plan, q, do, g, runs,
                                                    dfinal.astype(jnp.float32))
    dv = triton_grad.chunk_dv(plan, q, k, g, runs, do, dstates)
    G = plan.groups
    grad_dtype = q.dtype if G == 1 else jnp.float32
    dq, dk, dg = triton_grad.chunk_dqk(plan, q, k, v, g, runs, do, states, dstates, grad_dtype)
    if G > 1:
        B, T, _, K = q.shape
        dq = dq.reshape(B, T, plan.qk_heads, G, K).sum(3).astype(q.dtype)
        dk = dk.reshape(B, T, plan.qk_heads, G, K).sum(3).astype(k.dtype)
    if dg is not None and g.ndim == 3:
        dg = dg.sum(0) if dg.shape[0] > 1 else dg[0]
    return (dq, dk, dv, dg, dinit if initial_state is not None else None, None)


_chunked.defvjp(_chunked_fwd, _chunked_bwd)
