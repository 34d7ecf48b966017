"""Split-K decoding attention over a KV cache in Pallas Mosaic TPU.

Computes what ``triton/decode.py`` computes (formula there): the reduction over the cache
is split into ``num_splits`` parallel programs per row whose partials
``reference.combine_splits`` merges.

The cache is viewed as ``[B, S, Hkv*D]`` (free reshape) and read in ``[block_k, hb*D]``
slabs covering ``hb`` KV heads (the fewest whose columns form a legal 128-lane tile of >= 512
contiguous bytes: hb = 2 for D = 128 bf16, 4 for D = 64; all heads when none qualifies, the
full width being always legal), so any D works without a copy of the cache and each KV head
is read exactly once. The ``hb * G`` query heads of the group meet the slab in one MXU
matmul against a block-diagonal ``[hb*G, hb*D]`` query (row (i, g) holds that query in KV
head i's columns, zeros elsewhere) and one ``[hb*G, block_k] x [block_k, hb*D]`` matmul
whose diagonal blocks the epilogue keeps. The factor-hb MXU waste is harmless: the
arithmetic intensity is ~hb*G FLOP/byte against ridges of 240 (v5e) and 166 (v5p), so the
kernel is HBM-bound, with ~1 MiB of K and of V per grid step against a ~0.35 us step cost.
Grid ``(num_splits, B, Hkv/hb, blocks)`` = (parallel x3, arbitrary); lengths are
scalar-prefetched so the index map clamps blocks past a row's length to its last block (no
DMA for them) and ``pl.when`` skips their compute; only the grid-step overhead is paid for
them. Two splits keep both TensorCores of a megacore (v4, v5p) busy at B = 1.

Gradients: the kernel is forward-only; ``jax.grad`` goes through a custom_vjp whose backward
is the VJP of ``reference.decode_attention_xla``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from seqmix.kernels import common
from seqmix.kernels.attention import reference, tuning
from seqmix.kernels.common import cdiv
from seqmix.kernels.dispatch import interpret_mode

Array = jax.Array

# --- TPU: slab bytes per K or V block and the number of parallel splits (megacore) -------
TPU_SLAB_BYTES = 1 << 20  # ~1 MiB of K (and of V) per grid step: the ~0.35 us step cost <15%
TPU_MIN_ROW_BYTES = 512  # contiguous bytes per cache row in one DMA (tunable, untested on HW)
TPU_LANES = 128


def _tpu_block(j, b, ii, len_ref, *, block_k, num_splits, seq_len):
    """Cache block of grid step (split j, row b, step ii), clamped to the row's last block,
    and whether the step computes."""
    length = jnp.clip(len_ref[b], 0, seq_len)
    n_blocks = cdiv(length, block_k)
    per_split = cdiv(n_blocks, num_splits)
    blk = j * per_split + ii
    run = jnp.logical_and(ii < per_split, blk < n_blocks)
    held = j * per_split + jnp.minimum(ii, jnp.maximum(per_split - 1, 0))
    return jnp.clip(held, 0, jnp.maximum(n_blocks - 1, 0)), run, length


def _tpu_kernel(
    len_ref,
    q_ref,
    k_ref,
    v_ref,
    o_ref,
    m_ref,
    l_ref,
    m_sc,
    l_sc,
    acc_sc,
    *,
    scale,
    softcap,
    block_k,
    num_splits,
    seq_len,
    n_steps,
    compute_dtype,
):
    j, b, ii = pl.program_id(0), pl.program_id(1), pl.program_id(3)
    blk, run, length = _tpu_block(
        j, b, ii, len_ref, block_k=block_k, num_splits=num_splits, seq_len=seq_len
    )
    W = acc_sc.shape[1]
    reps = cdiv(W, TPU_LANES)
    prec = lax.Precision.HIGHEST if compute_dtype == jnp.float32 else None

    @pl.when(ii == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    def step(masked: bool):
        q = q_ref[...].astype(compute_dtype)  # [Hg, W] block-diagonal
        k = k_ref[...].astype(compute_dtype)  # [block_k, W]
        v = v_ref[...].astype(compute_dtype)
        s = lax.dot_general(
            q, k, (((1,), (1,)), ((), ())), precision=prec, preferred_element_type=jnp.float32
        )
        s = reference.cap_logits(s * scale, softcap)  # [Hg, block_k]
        if masked:  # the row's last block: keys past the length (or past S) are garbage
            kpos = blk * block_k + lax.broadcasted_iota(jnp.int32, s.shape, 1)
            s = jnp.where(kpos < length, s, -jnp.inf)
            vpos = blk * block_k + lax.broadcasted_iota(jnp.int32, v.shape, 0)
            # the select in float32: v5e's VPU has no bf16 arithmetic
            v = jnp.where(vpos < length, v.astype(jnp.float32), 0.0).astype(v.dtype)
        m_prev, l_prev = m_sc[...], l_sc[...]
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1)[:, None])  # finite: a valid key
        p = jnp.exp(s - jnp.tile(m_new, (1, block_k // TPU_LANES)))
        alpha = jnp.exp(m_prev - m_new)
        l_sc[...] = alpha * l_prev + jnp.sum(p, axis=1)[:, None]
        m_sc[...] = m_new
        pv = lax.dot_general(
            p.astype(v.dtype),
            v,
            (((1,), (0,)), ((), ())),
            precision=prec,
            preferred_element_type=jnp.float32,
        )
        acc_sc[...] = acc_sc[...] * jnp.tile(alpha, (1, reps))[:, :W] + pv

    is_last = (blk + 1) * block_k >= length
    pl.when(jnp.logical_and(run, is_last))(lambda: step(True))
    pl.when(jnp.logical_and(run, jnp.logical_not(is_last)))(lambda: step(False))

    @pl.when(ii == n_steps - 1)
    def _finish():
        o_ref[...] = acc_sc[...]
        m_ref[...] = m_sc[...]
        l_ref[...] = l_sc[...]


def tpu_heads_per_block(Hkv: int, D: int, itemsize: int) -> int:
    """KV heads per program: the fewest (a divisor of Hkv) whose ``hb * D`` columns form a
    legal lane tile (a multiple of 128) of at least ``TPU_MIN_ROW_BYTES`` contiguous bytes;
    all of them (the full, always legal width) when no divisor qualifies."""
    for hb in range(1, Hkv + 1):
        if Hkv % hb == 0 and (hb * D) % TPU_LANES == 0 and hb * D * itemsize >= TPU_MIN_ROW_BYTES:
            return hb
    return Hkv


def _tpu_block_k(S: int, W: int, itemsize: int) -> int:
    """Keys per slab: ~TPU_SLAB_BYTES per K (or V) block, a multiple of 128, >= 128."""
    bk = max(TPU_LANES, (TPU_SLAB_BYTES // (W * itemsize)) // TPU_LANES * TPU_LANES)
    return min(bk, cdiv(S, TPU_LANES) * TPU_LANES)


def _decode_tpu(
    q,
    k_cache,
    v_cache,
    lengths,
    *,
    scale,
    softcap,
    config: tuning.TpuDecodeConfig,
):
    B, H, D = q.shape
    S, Hkv = k_cache.shape[1], k_cache.shape[2]
    G = H // Hkv
    cdt = k_cache.dtype
    compute_dtype = jnp.float32 if cdt == jnp.float16 else jnp.dtype(cdt)
    hb = config.heads_per_block or tpu_heads_per_block(Hkv, D, cdt.itemsize)
    ng, Wb, Hg = Hkv // hb, hb * D, hb * G  # head groups, their columns and query rows
    Hgp = cdiv(Hg, 16) * 16
    bk = config.block_k or _tpu_block_k(S, Wb, cdt.itemsize)
    n_split = config.num_splits
    n_steps = cdiv(cdiv(S, bk), n_split)
    # block-diagonal queries per group: row (i, g) carries q of KV head i's g-th query head
    # in the columns of KV head i, zeros elsewhere: [B, ng, Hg, Wb]
    own = jnp.eye(hb, dtype=bool)
    qg = q.reshape(B, ng, hb, G, 1, D)
    q_bd = jnp.where(own[None, None, :, None, :, None], qg, 0).reshape(B, ng, Hg, Wb)
    q_bd = jnp.pad(q_bd.astype(cdt), ((0, 0), (0, 0), (0, Hgp - Hg), (0, 0)))
    k2, v2 = k_cache.reshape(B, S, Hkv * D), v_cache.reshape(B, S, Hkv * D)  # free views

    blk = functools.partial(_tpu_block, block_k=bk, num_splits=n_split, seq_len=S)
    kv_map = lambda j, b, h, ii, lens: (b, blk(j, b, ii, lens)[0], h)
    part_map = lambda j, b, h, ii, lens: (j, b, h, 0, 0)
    kernel = functools.partial(
        _tpu_kernel,
        scale=scale,
        softcap=softcap,
        block_k=bk,
        num_splits=n_split,
        seq_len=S,
        n_steps=n_steps,
        compute_dtype=compute_dtype,
    )
    o, m, l = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(n_split, B, ng, n_steps),
            in_specs=[
                pl.BlockSpec((None, None, Hgp, Wb), lambda j, b, h, ii, lens: (b, h, 0, 0)),
                pl.BlockSpec((None, bk, Wb), kv_map),
                pl.BlockSpec((None, bk, Wb), kv_map),
            ],
            out_specs=[
                pl.BlockSpec((None, None, None, Hgp, Wb), part_map),
                pl.BlockSpec((None, None, None, Hgp, TPU_LANES), part_map),
                pl.BlockSpec((None, None, None, Hgp, TPU_LANES), part_map),
            ],
            scratch_shapes=[
                pltpu.VMEM((Hgp, TPU_LANES), jnp.float32),
                pltpu.VMEM((Hgp, TPU_LANES), jnp.float32),
                pltpu.VMEM((Hgp, Wb), jnp.float32),
            ],
        ),
        out_shape=[
            jax.ShapeDtypeStruct((n_split, B, ng, Hgp, Wb), jnp.float32),
            jax.ShapeDtypeStruct((n_split, B, ng, Hgp, TPU_LANES), jnp.float32),
            jax.ShapeDtypeStruct((n_split, B, ng, Hgp, TPU_LANES), jnp.float32),
        ],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")
        ),
        cost_estimate=pl.CostEstimate(
            flops=4 * B * ng * Hgp * Wb * S,
            transcendentals=B * ng * Hgp * S,
            bytes_accessed=2 * B * S * Hkv * D * cdt.itemsize,
        ),
        interpret=common.interpret_params("pallas_tpu"),
        name="seqmix_decode_split_k_tpu",
    )(jnp.clip(lengths, 0, S).astype(jnp.int32), q_bd, k2, v2)
    # keep each query row's own KV head's columns: [n, B, ng, hb, G, hb, D] -> diagonal
    o = o[:, :, :, :Hg].reshape(n_split, B, ng, hb, G, hb, D)
    o = jnp.sum(jnp.where(own[:, None, :, None], o, 0.0), axis=5)
    return reference.combine_splits(
        o.reshape(n_split, B, H, D),
        m[..., :Hg, 0].reshape(n_split, B, H),
        l[..., :Hg, 0].reshape(n_split, B, H),
        q.dtype,
    )


_decode_tpu_vjp = reference.with_reference_vjp(_decode_tpu)


def decode_attention(
    q: Array,
    k_cache: Array,
    v_cache: Array,
    lengths: Array,
    *,
    scale: float,
    softcap: float | None,
    config: tuning.TpuDecodeConfig | None = None,
) -> Array:
    """Split-K decoding on TPU (Pallas Mosaic); see the module docstring. Returns o [B,H,D].
    ``config``: ``tuning.TpuDecodeConfig`` (None: the table's)."""
    common.no_float64(q, k_cache)
    cfg = tuning.tpu_decode_config(config, q.shape[-1], interpret=interpret_mode())
    return _decode_tpu_vjp(q, k_cache, v_cache, lengths, scale, softcap, cfg)
