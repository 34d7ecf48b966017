"""One decoding step of gated linear attention for a batch of rows, as a Pallas TPU kernel.

Per row ``b`` and v head ``h`` (q/k head ``h // (Hv // Hqk)``):

    S' = exp(g) * S + k v^T,      o = scale * q^T S'

with ``S`` float32 ``[K, V]`` and ``g`` None, a scalar or a ``[K]`` vector (<= 0). The step
reads and writes the whole state, ``8 K V`` bytes per head, against ``(2K + V) * 2`` bytes
of q, k, v: it is bound by HBM bandwidth on the state (about 0.16 us per 128 x 128 head on
v5e, 0.05 us on v5p). A grid step therefore takes several heads (up to 1 MiB of state) so
the ~0.35 us fixed cost of a step is amortised, and the new state aliases the old one.

Layout: q and k ``[B, Hqk, Kp]`` enter whole per row (they are tiny) and the kernel selects
the head's row with a masked reduction, so q/k are never repeated; v, per-channel g and o
travel as ``[B, Hv, 1, D]`` so that any number of heads forms a legal block; scalar g as
``[B, 1, Hv]``. ``K`` and ``V`` are zero-padded to multiples of 128 (exact).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from seqmix.kernels import common
from seqmix.kernels.common import pad_to
from seqmix.kernels.dispatch import interpret_mode
from seqmix.kernels.linear_attention import tuning
from seqmix.kernels.linear_attention.tpu.chunk import iota, pick_row, row_to_col

F32 = jnp.float32
LANES = 128


def _step_kernel(kind, rep, hb, scale, q_ref, k_ref, v_ref, *refs):
    if kind == "none":
        g_ref, (s_ref, o_ref, ns_ref) = None, refs
    else:
        g_ref, s_ref, o_ref, ns_ref = refs
    qs, ks = q_ref[...].astype(F32), k_ref[...].astype(F32)  # [Hqk, Kp]
    h0 = pl.program_id(1) * hb

    def head(i, carry):
        h = h0 + i
        q_col = row_to_col(pick_row(qs, h // rep))  # [Kp, 1]
        k_col = row_to_col(pick_row(ks, h // rep))
        S = s_ref[i]
        if kind == "scalar":  # g_ref [1, Hv]
            g = g_ref[...]
            g = jnp.sum(jnp.where(iota(g.shape, 1) == h, g, 0.0), axis=1, keepdims=True)
            S = jnp.exp(g) * S
        elif kind == "channel":  # g_ref [hb, 1, Kp]
            S = jnp.exp(row_to_col(g_ref[i])) * S
        S = S + k_col * v_ref[i].astype(F32)
        ns_ref[i] = S
        o_ref[i] = (scale * jnp.sum(q_col * S, axis=0, keepdims=True)).astype(o_ref.dtype)
        return carry

    lax.fori_loop(0, hb, head, 0)


def _heads_per_step(hv: int, state_bytes: int, bytes_per_step: int) -> int:
    best = 1
    for d in range(1, hv + 1):
        if hv % d == 0 and d * state_bytes <= bytes_per_step:
            best = d
    return best


def linear_attention_step(q, k, v, state, g, *, scale, config=None):
    """One token of ``linear_attention`` for every row of a batch (decoding).

    Args:
      q, k: ``[B, Hqk, K]``; v: ``[B, Hv, V]`` (one float dtype, ``Hv % Hqk == 0``).
      state: float32 ``[B, Hv, K, V]``.
      g: None, ``[B, Hv]`` or ``[B, Hv, K]`` float32 log decay (<= 0).
      scale: float.
      config: ``tuning.TpuStepConfig`` (None: the table's).

    Returns:
      ``(o [B, Hv, V] in q's dtype, new_state float32 [B, Hv, K, V])``.
    """
    dtype = jnp.dtype(q.dtype)
    if dtype.name not in ("bfloat16", "float16", "float32"):
        raise NotImplementedError(
            f"pallas_tpu linear_attention_step supports bf16/fp16/fp32 inputs, got {dtype}"
        )
    B, Hqk, K = q.shape
    Hv, V = v.shape[1], v.shape[2]
    rep = Hv // Hqk
    Kp, Vp = -(-K // LANES) * LANES, -(-V // LANES) * LANES
    cfg = tuning.tpu_step_config(config, interpret=interpret_mode())
    hb = _heads_per_step(Hv, Kp * Vp * 4, cfg.state_bytes_per_step)
    kind = "none" if g is None else ("scalar" if g.ndim == 2 else "channel")

    args = [pad_to(q, (B, Hqk, Kp)), pad_to(k, (B, Hqk, Kp)), pad_to(v, (B, Hv, Vp))[:, :, None]]
    qk_spec = pl.BlockSpec((None, Hqk, Kp), lambda b, j: (b, 0, 0))

    def row_spec(d):  # hb heads of [B, Hv, 1, d]
        return pl.BlockSpec((None, hb, 1, d), lambda b, j: (b, j, 0, 0))

    in_specs = [qk_spec, qk_spec, row_spec(Vp)]
    if kind == "scalar":
        args.append(g.astype(F32)[:, None, :])
        in_specs.append(pl.BlockSpec((None, 1, Hv), lambda b, j: (b, 0, 0)))
    elif kind == "channel":
        args.append(pad_to(g.astype(F32), (B, Hv, Kp))[:, :, None])
        in_specs.append(row_spec(Kp))
    args.append(pad_to(state.astype(F32), (B, Hv, Kp, Vp)))
    state_spec = pl.BlockSpec((None, hb, Kp, Vp), lambda b, j: (b, j, 0, 0))
    in_specs.append(state_spec)
    o, new_state = pl.pallas_call(
        functools.partial(_step_kernel, kind, rep, hb, float(scale)),
        grid=(B, Hv // hb),
        in_specs=in_specs,
        out_specs=[row_spec(Vp), state_spec],
        out_shape=[
            jax.ShapeDtypeStruct((B, Hv, 1, Vp), dtype),
            jax.ShapeDtypeStruct((B, Hv, Kp, Vp), F32),
        ],
        input_output_aliases={len(args) - 1: 1},
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
        interpret=common.interpret_params("pallas_tpu"),
        name="linear_attention_step",
    )(*args)
    return o[:, :, 0, :V], new_state[:, :, :K, :V]
