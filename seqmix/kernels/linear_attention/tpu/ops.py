"""Chunked gated linear attention on a TPU: the ``pallas_tpu`` implementation of
``seqmix.kernels.linear_attention`` (layout, padding and the custom VJP)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from seqmix.kernels.common import pad_to, round_up
from seqmix.kernels.dispatch import interpret_mode
from seqmix.kernels.linear_attention import reference, tuning
from seqmix.kernels.linear_attention.tpu import backward, forward
from seqmix.kernels.linear_attention.tpu.chunk import KernelConfig

F32 = jnp.float32
LANES = 128
TOKENS_PER_STEP = 1024


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _core(cfg, q, k, v, g, s0, rel):
    o, final, _ = forward.forward(cfg, q, k, v, g, s0, rel, save=False)
    return o, final


def _core_fwd(cfg, q, k, v, g, s0, rel):
    o, final, states = forward.forward(cfg, q, k, v, g, s0, rel, save=True)
    return (o, final), (q, k, v, g, rel, states)


def _core_bwd(cfg, res, cts):
    q, k, v, g, rel, states = res
    do, dfinal = cts
    dq, dk, dv, dg, ds0 = backward.backward(
        cfg, q, k, v, g, rel, states, do.astype(cfg.dtype), dfinal.astype(F32)
    )
    return dq, dk, dv, dg, ds0, None


_core.defvjp(_core_fwd, _core_bwd)


# --- layout and entry point ----------------------------------------------------------------------


@reference.masks_nonfinite_if_poisoned
def linear_attention(
    q,
    k,
    v,
    g,
    *,
    scale,
    initial_state,
    runs,
    chunk_size,
    config: tuning.TpuConfig | None = None,
):
    """Chunked gated linear attention on a TPU (reference.py's normalised contract).

    Args:
      q, k: ``[B, T, Hqk, K]``; v: ``[B, T, Hv, V]``, bf16/fp16/fp32 (one dtype).
      g: None, ``[B, T, Hv]`` or ``[B, T, Hv, K]`` float32 log decays (<= 0).
      scale: float. initial_state: float32 ``[B, Hv, K, V]`` or None.
      runs: None or ``[B, T]`` int32 non-decreasing run ids (the state resets where the id
        changes).
      chunk_size: C, a multiple of 16 (the bf16 sublane tile).
      config: ``tuning.TpuConfig``: the per-channel diagonal sub-block c (dividing C; a
        multiple of 16 for 16-bit inputs, of 8 for float32) and the chunks per grid step (a
        multiple of 8 unless the sequence fits in one step; None: about 1024 tokens).

    Returns:
      ``(o [B, T, Hv, V] in q's dtype, final_state float32 [B, Hv, K, V])``.
    """
    dtype = jnp.dtype(q.dtype)
    if dtype.name not in ("bfloat16", "float16", "float32"):
        raise NotImplementedError(
            f"pallas_tpu linear_attention supports bf16/fp16/fp32 inputs, got {dtype}"
        )
    C = chunk_size
    if C % 16:
        raise NotImplementedError(
            f"pallas_tpu linear_attention needs chunk_size a multiple of 16, got {C}"
        )
    cfg = tuning.tpu_config(config, interpret=interpret_mode())
    sub_chunk, chunks_per_step = cfg.sub_chunk, cfg.chunks_per_step
    sub = min(sub_chunk, C)
    tile = 16 if dtype.itemsize == 2 else 8  # rows of a (sublane x lane) tile
    if sub % tile or C % sub:
        raise NotImplementedError(
            f"sub_chunk must be a multiple of {tile} dividing chunk_size {C}, got {sub_chunk}"
        )
    B, T, Hqk, K = q.shape
    Hv, V = v.shape[2], v.shape[3]
    n = -(-T // C)
    m = chunks_per_step or round_up(max(1, TOKENS_PER_STEP // C), 8)
    if m >= n:
        m = n
    elif m % 8:
        raise NotImplementedError(f"chunks_per_step must be a multiple of 8, got {m}")
    blocks = -(-n // m)
    Tp, Kp, Vp = blocks * m * C, round_up(K, LANES), round_up(V, LANES)
    kind = "none" if g is None else ("scalar" if g.ndim == 3 else "channel")
    cfg = KernelConfig(
        hv=Hv,
        rep=Hv // Hqk,
        kp=Kp,
        vp=Vp,
        chunk=C,
        sub=sub,
        n=n,
        m=m,
        kind=kind,
        has_runs=runs is not None,
        has_init=initial_state is not None,
        scale=float(scale),
        dtype=dtype.name,
        interpret=interpret_mode(),
    )

    qp = pad_to(q, (B, Tp, Hqk, Kp)).reshape(B, Tp, Hqk * Kp)
    kp = pad_to(k, (B, Tp, Hqk, Kp)).reshape(B, Tp, Hqk * Kp)
    vp = pad_to(v, (B, Tp, Hv, Vp)).reshape(B, Tp, Hv * Vp)
    gp = None
    if kind == "scalar":  # [B, Hv, chunks, C] rows
        gp = pad_to(g.astype(F32), (B, Tp, Hv)).reshape(B, blocks * m, C, Hv).transpose(0, 3, 1, 2)
    elif kind == "channel":
        gp = pad_to(g.astype(F32), (B, Tp, Hv, Kp)).reshape(B, Tp, Hv * Kp)
    rel = None
    if runs is not None:  # run ids relative to the run of the token before each chunk
        r = jnp.pad(runs.astype(jnp.int32), [(0, 0), (0, Tp - T)], mode="edge")
        r = r.reshape(B, blocks * m, C)
        prev = jnp.concatenate([r[:, :1, 0], r[:, :-1, -1]], axis=1)
        rel = (r - prev[:, :, None]).astype(F32)
    s0 = None if initial_state is None else pad_to(initial_state.astype(F32), (B, Hv, Kp, Vp))
    o, final = _core(cfg, qp, kp, vp, gp, s0, rel)
    o = o.reshape(B, Tp, Hv, Vp)[:, :T, :, :V]
    return o, final[:, :, :K, :V]
