"""Flash attention in Pallas Triton: the ``pallas_triton`` implementation of
``seqmix.kernels.attention``, its padding and its custom VJP.

Any ``T``, ``S``: inputs are zero-padded to block multiples (padded keys masked, padded
query rows sliced off); head dims are padded to a power of two >= 16. bf16, fp16 and fp32
inputs; accumulation is float32 (fp32 inputs use IEEE dots, not tf32). Tile sizes come
from ``tuning.triton_config``.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from seqmix.kernels.attention import tuning
from seqmix.kernels.attention.triton import backward, forward
from seqmix.kernels.attention.triton.blocks import LN2, Static
from seqmix.kernels.dispatch import interpret_mode

DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)


# --- custom_vjp wiring and the public entry points ------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash(q, k, v, qseg, kseg, st):
    return _flash_fwd(q, k, v, qseg, kseg, st)[0]


def _flash_fwd(q, k, v, qseg, kseg, st):
    o, lse2 = forward.forward(q, k, v, qseg, kseg, st)
    lse = jnp.where(lse2 == jnp.inf, -jnp.inf, lse2 * LN2)
    return (o, lse), (q, k, v, qseg, kseg, o, lse2)


def _flash_bwd(st, res, cts):
    q, k, v, qseg, kseg, o, lse2 = res
    do, dlse = cts
    dlse = jnp.where(lse2 == jnp.inf, 0.0, dlse.astype(jnp.float32))
    delta = backward.delta(o, do, dlse, st)
    q, do, lse2, delta = backward.drop_dead_rows(q, do, lse2, delta)
    dk, dv = backward.dkdv(q, k, v, do, lse2, delta, qseg, kseg, st)
    dq = backward.dq(q, k, v, do, lse2, delta, qseg, kseg, st)
    return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)
_flash_jit = jax.jit(_flash, static_argnums=(5,))  # eager callers trace the kernels once


def _fit(blocks: tuning.Blocks, T: int, S: int) -> tuning.Blocks:
    """Shrinks a tile to the problem (powers of two, at least 16)."""
    cap = lambda n, b: min(b, max(16, 1 << max(n - 1, 0).bit_length()))
    return dataclasses.replace(
        blocks, block_q=cap(T, blocks.block_q), block_k=cap(S, blocks.block_k)
    )


def flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    window: tuple[int | None, int | None] = (None, None),
    segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    softcap: float | None = None,
    scale: float | None = None,
    config: tuning.TritonConfig | None = None,
    interpret: bool | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Flash attention, differentiable in ``q, k, v``: returns ``(o [B,T,H,D] in q's dtype,
    lse [B,T,H] float32)``. ``window = (left, right)`` as in ``api.normalize_window``
    (``(None, 0)`` is causal); ``segment_ids [B, T]`` and ``kv_segment_ids [B, S]`` (default:
    ``segment_ids``) as in ``api.attention``. ``config`` sets tiles per kernel
    (``tuning.TritonConfig``; None: the table's); ``interpret`` defaults to
    ``dispatch.interpret_mode()``."""
    _B, T, H, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    if H % Hkv or k.shape != v.shape or k.shape[::3] != q.shape[::3]:
        raise ValueError(
            f"q {q.shape} and k, v {k.shape}, {v.shape}: expected [B, T, H, D] "
            "and [B, S, Hkv, D] with H a multiple of Hkv"
        )
    interpret = interpret_mode() if interpret is None else interpret
    scale = D**-0.5 if scale is None else scale
    Dp = tuning.head_dim_bucket(D)
    cfg = tuning.triton_config(config, Dp, q.dtype, interpret=interpret)
    tiles = {kind: _fit(getattr(cfg, kind), T, S) for kind in tuning.FLASH_KINDS}
    q_mult = max(b.block_q for b in tiles.values())
    k_mult = max(b.block_k for b in tiles.values())
    Tp, Sp = -(-T // q_mult) * q_mult, -(-S // k_mult) * k_mult
    q = jnp.pad(q, ((0, 0), (0, Tp - T), (0, 0), (0, Dp - D)))
    k = jnp.pad(k, ((0, 0), (0, Sp - S), (0, 0), (0, Dp - D)))
    v = jnp.pad(v, ((0, 0), (0, Sp - S), (0, 0), (0, Dp - D)))
    qseg = kseg = None
    if segment_ids is not None:
        # edge padding keeps sorted ids sorted; padded keys are masked by position
        pad = lambda ids, n: jnp.pad(ids.astype(jnp.int32), ((0, 0), (0, n)), mode="edge")
        kv_ids = segment_ids if kv_segment_ids is None else kv_segment_ids
        qseg, kseg = pad(segment_ids, Tp - T), pad(kv_ids, Sp - S)
    left, right = window
    st = Static(
        left=left,
        right=right,
        S=S,
        groups=H // Hkv,
        scale=float(scale),
        softcap=None if softcap is None else float(softcap),
        segments=qseg is not None,
        fwd=tiles["fwd"],
        bwd=tiles["bwd"],
        bwd_dq=tiles["bwd_dq"],
        interpret=interpret,
        precision=lax.Precision.HIGHEST if q.dtype == jnp.float32 else None,
    )
    o, lse = _flash_jit(q, k, v, qseg, kseg, st)
    return o[:, :T, :, :D], jnp.transpose(lse[:, :, :T], (0, 2, 1))


def attention(
    q,
    k,
    v,
    *,
    causal,
    window,
    segment_ids,
    softcap,
    scale,
    return_lse,
    kv_segment_ids=None,
    config=None,
):
    """The ``pallas_triton`` implementation of ``seqmix.kernels.attention`` (normalised
    arguments, see ``api.py``): returns ``(o, lse)``, lse ``None`` unless ``return_lse``."""
    if not any(q.dtype == jnp.dtype(d) for d in DTYPES):
        raise NotImplementedError(
            f"pallas_triton attention takes bfloat16, float16 or float32 inputs, got {q.dtype}"
        )
    if q.shape[-1] > 256:
        raise NotImplementedError(
            f"pallas_triton attention supports head dims up to 256, got {q.shape[-1]}"
        )
    if causal and window[1] != 0:
        raise ValueError(f"causal attention needs window right = 0, got window={window}")
    o, lse = flash_attention(
        q,
        k,
        v,
        window=window,
        segment_ids=segment_ids,
        kv_segment_ids=kv_segment_ids,
        softcap=softcap,
        scale=scale,
        config=config,
    )
    return o, (lse if return_lse else None)
