"""Flash attention in Pallas Mosaic TPU: the ``pallas_tpu`` implementation of
``seqmix.kernels.attention``, its layout and its custom VJP.

Layout. ``[B, T, H, D]`` is viewed (free reshape) as ``[B, T, H*D]``: a ``(block, D)`` tile at
lane offset ``h*D`` is a legal Mosaic block when ``D % 128 == 0``, so q, k, v, o, dq, dk, dv
are never transposed. Other head dims are zero-padded to the next multiple of 128 (the MXU is
128 wide, so a D = 64 contraction costs the same MXU passes as D = 128 anyway). The sequence
is zero-padded to the block size; padded keys are masked, padded queries are sliced away.
Segment ids are broadcast to ``[B, T, 128]`` (column use) and ``[B, 8, T]`` (row use) int32.
Query head ``h`` reads KV head ``h // G`` through the index maps.

Roofline (bf16, D = 128, bq = bk = 512). Forward FLOPs ``4 B H T S D`` (x the visible
fraction); each (q block, kv step) moves ``2 * bk * D * 2`` bytes of K/V for ``4 bq bk D``
FLOPs: an arithmetic intensity of ``bq = 512`` FLOP/byte, above the ridge of v5e
(197 TFLOP/s / 819 GB/s = 240) and v5p (459 TFLOP/s / 2.76 TB/s = 166), so the kernel is MXU-
and VPU-bound, not HBM-bound. The softmax costs ~10 VPU/EUP ops per logit against 4D = 512
MXU FLOPs per logit, close to the VPU's throughput at MXU peak; the backward is 3.5x the
forward FLOPs (dK/dV: 4 matmuls, dQ: 3; intensity 2*bk and 1.5*bq FLOP/byte, also
compute-bound). Grid-step overhead (~0.35 us) is <5% at 512 x 512 blocks. D = 64 pads to 128,
so it reaches half the useful TFLOP/s of D = 128. float16 has no MXU path on v5: it is
computed in float32 (cast in XLA before the kernel); float32 uses HIGHEST precision (6 bf16
passes). Sequence padding and the D padding cost one copy of q/k/v (O(T H D)), negligible
against the O(T S H D) kernel at T >= 1k. The kernels have not been timed on a TPU; they are
checked in interpret mode and by lowering to Mosaic.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from seqmix.kernels.attention import tuning
from seqmix.kernels.attention.tpu import backward, forward
from seqmix.kernels.attention.tpu.blocks import LANES, Cfg
from seqmix.kernels.common import round_up
from seqmix.kernels.dispatch import interpret_mode

Array = jax.Array

# --- layout and custom_vjp wiring -------------------------------------------------------------


def _to_kernel(x, L, c: Cfg):
    """[B, N, Hx, D] -> [B, L, Hx*Dp] in the compute dtype (zero padding)."""
    B, N, Hx, D = x.shape
    x = x.astype(c.compute_dtype)
    if L != N or c.Dp != D:
        x = jnp.pad(x, ((0, 0), (0, L - N), (0, 0), (0, c.Dp - D)))
    return x.reshape(B, L, Hx * c.Dp)


def _from_kernel(x, N, Hx, c: Cfg, dtype):
    B, L, _ = x.shape
    return x.reshape(B, L, Hx, c.Dp)[:, :N, :, : c.D].astype(dtype)


def _rows_to_kernel(x, c: Cfg, fill):
    """[B, T, H] float32 -> [B, H, 1, Tp], padded rows = ``fill``."""
    x = jnp.transpose(x, (0, 2, 1))
    x = jnp.pad(x, ((0, 0), (0, 0), (0, c.Tp - c.T)), constant_values=fill)
    return x[:, :, None, :]


def _fwd_impl(q, k, v, segment_ids, kv_segment_ids, c: Cfg):
    qk, kk, vk = _to_kernel(q, c.Tp, c), _to_kernel(k, c.Sp, c), _to_kernel(v, c.Sp, c)
    seg = forward.seg_arrays(segment_ids, kv_segment_ids, c) if c.has_seg else None
    ok, lse_k = forward.forward(qk, kk, vk, seg, c)
    o = _from_kernel(ok, c.T, c.H, c, q.dtype)
    lse = jnp.transpose(lse_k[:, :, 0, : c.T], (0, 2, 1))
    return (o, lse), (qk, kk, vk, seg, o, lse_k)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash(q, k, v, segment_ids, kv_segment_ids, c: Cfg):
    return _fwd_impl(q, k, v, segment_ids, kv_segment_ids, c)[0]


def _flash_fwd(q, k, v, segment_ids, kv_segment_ids, c: Cfg):
    return _fwd_impl(q, k, v, segment_ids, kv_segment_ids, c)


def _flash_bwd(c: Cfg, res, cts):
    qk, kk, vk, seg, o, lse_k = res
    do, dlse = cts
    # a row whose output is not finite (it attended a non-finite key or value) passes no
    # gradient, as through ``where``: its dO and delta are zeroed and its lse made +inf
    dead = ~jnp.all(jnp.isfinite(o), axis=-1)  # [B, T, H]
    do = jnp.where(dead[..., None], jnp.zeros_like(do), do)
    delta = jnp.sum(do.astype(jnp.float32) * jnp.where(dead[..., None], 0, o), axis=-1)
    dc = _rows_to_kernel(jnp.where(dead, 0.0, dlse.astype(jnp.float32)) - delta, c, 0.0)
    # rows without keys (lse = -inf) and padded rows get lse = +inf: exp(s - lse) = 0, no NaN
    t = jnp.arange(c.Tp)
    alive = ~_rows_to_kernel(dead, c, True)
    lse_b = jnp.where(jnp.isfinite(lse_k) & (t < c.T) & alive, lse_k, jnp.inf)
    dok = _to_kernel(do, c.Tp, c)
    dqk, dkk, dvk = backward.backward(qk, kk, vk, seg, dok, lse_b, dc, c)
    dt = jnp.dtype(c.dtype)
    return (
        _from_kernel(dqk, c.T, c.H, c, dt),
        _from_kernel(dkk, c.S, c.Hkv, c, dt),
        _from_kernel(dvk, c.S, c.Hkv, c, dt),
        None,
        None,
    )


_flash.defvjp(_flash_fwd, _flash_bwd)


def _pick_block(n: int, target: int) -> int:
    """Largest power-of-two multiple of 128 <= target whose padding of ``n`` is <= n/8."""
    b = target
    while b > LANES and (b >= 2 * round_up(n, LANES) or round_up(n, b) - n > n // 8):
        b //= 2
    return b


def attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    causal: bool,
    window: tuple[int | None, int | None],
    segment_ids: Array | None,
    softcap: float | None,
    scale: float,
    return_lse: bool,
    kv_segment_ids: Array | None = None,
    config: tuning.TpuConfig | None = None,
) -> tuple[Array, Array | None]:
    """Flash attention on TPU (Pallas Mosaic); see the module docstring.

    Args:
      q: ``[B, T, H, D]``; k, v: ``[B, S, Hkv, D]`` (``H % Hkv == 0``), one float dtype.
      causal, window, segment_ids, kv_segment_ids, softcap, scale, return_lse: as
        ``api.attention`` after normalisation (``window = (left, right)``, ``None`` =
        unbounded side; ``kv_segment_ids`` None: ``segment_ids``).
      config: ``tuning.TpuConfig`` (block sizes, multiples of 128; None: the table's, fitted
        to the sequence).

    Returns:
      ``(o [B,T,H,D] in q's dtype, lse [B,T,H] float32 or None)``; differentiable in q, k, v
      (and through lse).
    """
    if jnp.dtype(q.dtype) == jnp.float64:
        raise NotImplementedError("pallas_tpu attention: float64 is not supported on TPU")
    B, T, H, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    left, right = window
    if causal:
        right = 0
    Dp = round_up(D, LANES)
    cfg = tuning.tpu_config(
        config,
        Dp,
        interpret=interpret_mode(),
        adjust=lambda c: tuning.TpuConfig(_pick_block(T, c.block_q), _pick_block(S, c.block_k)),
    )
    bq, bk = cfg.block_q, cfg.block_k
    dtype = jnp.dtype(q.dtype).name
    c = Cfg(
        B=B,
        T=T,
        S=S,
        H=H,
        Hkv=Hkv,
        D=D,
        Dp=Dp,
        Tp=round_up(T, bq),
        Sp=round_up(S, bk),
        bq=bq,
        bk=bk,
        causal=bool(causal),
        left=left,
        right=right,
        softcap=softcap,
        scale=float(scale),
        has_seg=segment_ids is not None,
        dtype=dtype,
        compute_dtype="float32" if dtype == "float16" else dtype,
        interpret=interpret_mode(),
    )
    o, lse = _flash(q, k, v, segment_ids, kv_segment_ids, c)
    return o, (lse if return_lse else None)
