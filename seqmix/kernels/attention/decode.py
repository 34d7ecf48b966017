"""Split-K decoding attention over a KV cache (flash-decoding) in Pallas, for GPU and TPU.

``decode_attention_*(q, k_cache, v_cache, lengths, *, scale, softcap)`` computes, for each row
``b`` and query head ``h`` (KV head ``h // G``, ``G = H / Hkv``)::

    o[b, h] = sum_{s < lengths[b]} softmax_s(cap(scale * q[b,h] . k[b,s,h//G])) v[b,s,h//G]

with ``q [B,H,D]``, caches ``[B,S,Hkv,D]`` read in their own layout and dtype, ``lengths [B]``
ints (clipped to ``[0, S]``), ``o [B,H,D]`` in q's dtype, 0 for a row of length 0.

The reduction over the cache is split (flash-decoding; Lean Attention's stream-K view of the
same reduction): row ``b``'s ``ceil(lengths[b] / block_k)`` key blocks are dealt in equal
contiguous chunks to ``num_splits`` programs, so every program of a row does the same work
and the cost follows the length, not the cache size (blocks past the length are never read).
Each program returns unnormalised partials ``(o_j, m_j, l_j)`` (float32); an XLA epilogue
combines them: ``m = max_j m_j``, ``o = sum_j e^{m_j - m} o_j / sum_j e^{m_j - m} l_j``.

GPU (``decode_attention_triton``): grid ``(B, Hkv, num_splits)``; a program holds the G query
heads of its KV head as a ``[G -> 16, D]`` tile (the tensor-core minimum), so each K/V block
``[block_k, D]`` is read from HBM once per group (16-byte vector loads along D: D is
contiguous in the cache) and feeds one ``[16,D] x [D,block_k]`` and one
``[16,block_k] x [block_k,D]`` dot. ``num_splits`` is chosen from S and the SM count so that
``B * Hkv * num_splits`` covers the SMs many times over (B = 4, Hkv = 8 at S = 128k: 64
splits of 2048 keys = 2048 programs, 8-16 waves of 1-2 resident programs per SM on an H200,
so the wave tail costs ~3%). ``block_k``, warps and stages come from ``tuning.py``. Memory roofline: 128k x 8 heads x 128 x 2 B x 2 (K, V) = 537 MB
per row; at 4 rows, 2.1 GB / 4.8 TB/s = 0.45 ms at peak; the partials (B x Hkv x splits x 16 x
(D + 2) x 4 B = 8.6 MB) add <1%.

TPU (``decode_attention_tpu``): the cache is viewed as ``[B, S, Hkv*D]`` (free reshape) and
read in ``[block_k, hb*D]`` slabs covering ``hb`` KV heads (the fewest whose columns form a
legal 128-lane tile of >= 512 contiguous bytes: hb = 2 for D = 128 bf16, 4 for D = 64; all
heads when none qualifies, the full width being always legal), so any D works without a copy
of the cache and each KV head is read exactly once. The ``hb * G`` query heads of the group
meet the slab in one MXU matmul against a block-diagonal ``[hb*G, hb*D]`` query (row (i, g)
holds that query in KV head i's columns, zeros elsewhere) and one
``[hb*G, block_k] x [block_k, hb*D]`` matmul whose diagonal blocks the epilogue keeps. The
factor-hb MXU waste is harmless: the arithmetic intensity is ~hb*G FLOP/byte against ridges
of 240 (v5e) and 166 (v5p), so the kernel is HBM-bound (expected: ~85-90% of 819 GB/s on
v5e, of 2.76 TB/s on v5p, with ~1 MiB of K and of V per grid step against a ~0.35 us step
cost). Grid ``(num_splits, B, Hkv/hb, blocks)`` = (parallel x3, arbitrary); lengths are
scalar-prefetched so the index map clamps blocks past a row's length to its last block (no
DMA for them) and ``pl.when`` skips their compute; only the grid-step overhead is paid for
them. Two splits keep both TensorCores of a megacore (v4, v5p) busy at B = 1.

Gradients: the kernels are forward-only; ``jax.grad`` goes through a custom_vjp whose backward
is the VJP of ``reference.decode_attention_xla`` (exact, materialises [B,H,S] logits).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

from seqmix.kernels.attention import reference, tuning
from seqmix.kernels.dispatch import interpret_mode

Array = jax.Array

# --- GPU: block_k, warps and stages come from attention/tuning.py ("decode" rows); the split
# policy is this module's: ~KEYS_PER_SPLIT keys per program, >= 4 programs per SM.
KEYS_PER_SPLIT = 2048
GPU_DEFAULT_SMS = 132  # H200 / H100 SXM
MAX_SPLITS = 1024

# --- TPU: slab bytes per K or V block and the number of parallel splits (megacore) -------
TPU_SLAB_BYTES = 1 << 20  # ~1 MiB of K (and of V) per grid step: the ~0.35 us step cost <15%
TPU_MIN_ROW_BYTES = 512  # contiguous bytes per cache row in one DMA (tunable, untested on HW)
TPU_SPLITS = 2  # parallel splits: both TensorCores of a v4/v5p megacore busy at B = 1
TPU_LANES = 128


def _cdiv(a, b):
    return (a + b - 1) // b


def _cap(s, softcap):
    return s if softcap is None else softcap * jnp.tanh(s / softcap)


def _combine(o, m, l, out_dtype):
    """Log-sum-exp merge of split partials along axis 0: o [n, ..., D], m, l [n, ...]."""
    m_max = jnp.max(m, axis=0)
    m_max = jnp.where(jnp.isfinite(m_max), m_max, 0.0)  # all splits empty (length 0)
    w = jnp.exp(m - m_max[None])  # empty split: exp(-inf) = 0
    l_tot = jnp.sum(w * l, axis=0)
    o_tot = jnp.sum(w[..., None] * o, axis=0)
    return (o_tot / jnp.where(l_tot > 0, l_tot, 1.0)[..., None]).astype(out_dtype)


def _with_reference_vjp(kernel_fn):
    """Wraps a forward-only decode kernel so that jax.grad uses the XLA reference's VJP."""

    @functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
    def f(q, k_cache, v_cache, lengths, scale, softcap):
        return kernel_fn(q, k_cache, v_cache, lengths, scale=scale, softcap=softcap)

    def fwd(q, k_cache, v_cache, lengths, scale, softcap):
        return f(q, k_cache, v_cache, lengths, scale, softcap), (q, k_cache, v_cache, lengths)

    def bwd(scale, softcap, res, do):
        q, k_cache, v_cache, lengths = res
        _, vjp = jax.vjp(
            lambda q, k, v: reference.decode_attention_xla(
                q, k, v, lengths, scale=scale, softcap=softcap
            ),
            q,
            k_cache,
            v_cache,
        )
        return (*vjp(do), None)

    f.defvjp(fwd, bwd)
    return f


def _check(q, k_cache, name):
    if jnp.dtype(q.dtype) == jnp.float64 or jnp.dtype(k_cache.dtype) == jnp.float64:
        raise NotImplementedError(f"{name}: float64 is not supported")


# --- GPU (Triton) ----------------------------------------------------------------------------


def _num_sms() -> int:
    if jax.default_backend() == "gpu":
        return int(getattr(jax.devices()[0], "core_count", GPU_DEFAULT_SMS) or GPU_DEFAULT_SMS)
    return GPU_DEFAULT_SMS  # lowering for the H200 on a CPU


def gpu_num_splits(
    B: int, Hkv: int, S: int, block_k: int, keys_per_split: int, num_sms: int
) -> int:
    """Splits per row: ~``keys_per_split`` keys each, at least 4 programs per SM when S
    allows, at most one split per key block and ``MAX_SPLITS``."""
    want = max(_cdiv(S, keys_per_split), _cdiv(4 * num_sms, B * Hkv))
    return max(1, min(want, _cdiv(S, block_k), MAX_SPLITS))


def _triton_kernel(
    len_ref,
    q_ref,
    k_ref,
    v_ref,
    o_ref,
    m_ref,
    l_ref,
    *,
    scale,
    softcap,
    block_k,
    num_splits,
    seq_len,
):
    split = pl.program_id(2)
    length = jnp.clip(len_ref[...], 0, seq_len)
    n_blocks = _cdiv(length, block_k)
    per_split = _cdiv(n_blocks, num_splits)
    first = split * per_split
    last = jnp.minimum(first + per_split, n_blocks)
    q = q_ref[...]  # [Gp, D]
    Gp, D = q.shape
    offs = jnp.arange(block_k)

    def body(blk, carry):
        o, m, l = carry
        start = blk * block_k
        valid = (start + offs) < length  # only the row's last block has invalid keys
        vmask = jnp.broadcast_to(valid[:, None], (block_k, D))
        k = plgpu.load(k_ref.at[pl.ds(start, block_k), :], mask=vmask, other=0.0)
        s = _cap(plgpu.dot(q, k, trans_b=True) * scale, softcap)  # [Gp, block_k] f32
        s = jnp.where(valid[None, :], s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))  # finite: each block has a valid key
        alpha = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new[:, None])
        l = alpha * l + jnp.sum(p, axis=1)
        v = plgpu.load(v_ref.at[pl.ds(start, block_k), :], mask=vmask, other=0.0)
        o = alpha[:, None] * o + plgpu.dot(p.astype(v.dtype), v)
        return o, m_new, l

    init = (
        jnp.zeros((Gp, D), jnp.float32),
        jnp.full((Gp,), -jnp.inf, jnp.float32),
        jnp.zeros((Gp,), jnp.float32),
    )
    o, m, l = lax.fori_loop(first, last, body, init)
    o_ref[...] = o
    m_ref[...] = m
    l_ref[...] = l


def _decode_triton(
    q,
    k_cache,
    v_cache,
    lengths,
    *,
    scale,
    softcap,
    block_k=None,
    num_splits=None,
    num_warps=None,
    num_stages=None,
):
    B, H, D = q.shape
    S, Hkv = k_cache.shape[1], k_cache.shape[2]
    G = H // Hkv
    if D < 16 or D & (D - 1):
        raise NotImplementedError(
            f"pallas_triton decode_attention needs a power-of-two head_dim >= 16, got {D}"
        )
    tile = tuning.attention_blocks(D, k_cache.dtype, kind="decode", interpret=interpret_mode())
    bk = block_k or tile.block_k
    # interpret mode: few splits of a few blocks each, so every code path runs at test shapes
    keys_per_split = 4 * bk if interpret_mode() else KEYS_PER_SPLIT
    n_split = num_splits or gpu_num_splits(
        B, Hkv, S, bk, keys_per_split, 1 if interpret_mode() else _num_sms()
    )
    Gp = max(tile.block_q, 1 << (G - 1).bit_length())  # query heads of a group, >= 16
    warps, stages = tile.num_warps, tile.num_stages
    cdt = k_cache.dtype
    qg = q.reshape(B, Hkv, G, D).astype(cdt)
    if Gp != G:
        qg = jnp.pad(qg, ((0, 0), (0, 0), (0, Gp - G), (0, 0)))
    kernel = functools.partial(
        _triton_kernel, scale=scale, softcap=softcap, block_k=bk, num_splits=n_split, seq_len=S
    )
    o, m, l = pl.pallas_call(
        kernel,
        grid=(B, Hkv, n_split),
        in_specs=[
            pl.BlockSpec((None,), lambda b, h, j: (b,)),
            pl.BlockSpec((None, None, Gp, D), lambda b, h, j: (b, h, 0, 0)),
            pl.BlockSpec((None, S, None, D), lambda b, h, j: (b, 0, h, 0)),
            pl.BlockSpec((None, S, None, D), lambda b, h, j: (b, 0, h, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, Gp, D), lambda b, h, j: (j, b, h, 0, 0)),
            pl.BlockSpec((None, None, None, Gp), lambda b, h, j: (j, b, h, 0)),
            pl.BlockSpec((None, None, None, Gp), lambda b, h, j: (j, b, h, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((n_split, B, Hkv, Gp, D), jnp.float32),
            jax.ShapeDtypeStruct((n_split, B, Hkv, Gp), jnp.float32),
            jax.ShapeDtypeStruct((n_split, B, Hkv, Gp), jnp.float32),
        ],
        compiler_params=plgpu.CompilerParams(
            num_warps=warps if num_warps is None else num_warps,
            num_stages=stages if num_stages is None else num_stages,
        ),
        interpret=interpret_mode(),
        name="seqmix_decode_split_k",
    )(lengths.astype(jnp.int32), qg, k_cache, v_cache)
    o = _combine(o[:, :, :, :G], m[:, :, :, :G], l[:, :, :, :G], q.dtype)
    return o.reshape(B, H, D)


_decode_triton_vjp = _with_reference_vjp(_decode_triton)


def decode_attention_triton(
    q: Array, k_cache: Array, v_cache: Array, lengths: Array, *, scale: float, softcap: float | None
) -> Array:
    """Flash-decoding on GPU (Pallas Triton); see the module docstring. Returns o [B,H,D]."""
    _check(q, k_cache, "pallas_triton decode_attention")
    return _decode_triton_vjp(q, k_cache, v_cache, lengths, scale, softcap)


# --- TPU (Mosaic) ----------------------------------------------------------------------------


def _tpu_block(j, b, ii, len_ref, *, block_k, num_splits, seq_len):
    """Cache block of grid step (split j, row b, step ii), clamped to the row's last block,
    and whether the step computes."""
    length = jnp.clip(len_ref[b], 0, seq_len)
    n_blocks = _cdiv(length, block_k)
    per_split = _cdiv(n_blocks, num_splits)
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
    reps = _cdiv(W, TPU_LANES)
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
        s = _cap(s * scale, softcap)  # [Hg, block_k]
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
    return min(bk, _cdiv(S, TPU_LANES) * TPU_LANES)


def _decode_tpu(
    q,
    k_cache,
    v_cache,
    lengths,
    *,
    scale,
    softcap,
    block_k=None,
    num_splits=None,
    heads_per_block=None,
):
    B, H, D = q.shape
    S, Hkv = k_cache.shape[1], k_cache.shape[2]
    G = H // Hkv
    cdt = k_cache.dtype
    compute_dtype = jnp.float32 if cdt == jnp.float16 else jnp.dtype(cdt)
    hb = heads_per_block or tpu_heads_per_block(Hkv, D, cdt.itemsize)
    ng, Wb, Hg = Hkv // hb, hb * D, hb * G  # head groups, their columns and query rows
    Hgp = _cdiv(Hg, 16) * 16
    bk = block_k or (TPU_LANES if interpret_mode() else _tpu_block_k(S, Wb, cdt.itemsize))
    if bk % TPU_LANES:
        raise ValueError(f"block_k must be a multiple of {TPU_LANES}, got {bk}")
    n_split = num_splits or TPU_SPLITS
    n_steps = _cdiv(_cdiv(S, bk), n_split)
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
        interpret=pltpu.InterpretParams(detect_races=True) if interpret_mode() else False,
        name="seqmix_decode_split_k_tpu",
    )(jnp.clip(lengths, 0, S).astype(jnp.int32), q_bd, k2, v2)
    # keep each query row's own KV head's columns: [n, B, ng, hb, G, hb, D] -> diagonal
    o = o[:, :, :, :Hg].reshape(n_split, B, ng, hb, G, hb, D)
    o = jnp.sum(jnp.where(own[:, None, :, None], o, 0.0), axis=5)
    return _combine(
        o.reshape(n_split, B, H, D),
        m[..., :Hg, 0].reshape(n_split, B, H),
        l[..., :Hg, 0].reshape(n_split, B, H),
        q.dtype,
    )


_decode_tpu_vjp = _with_reference_vjp(_decode_tpu)


def decode_attention_tpu(
    q: Array, k_cache: Array, v_cache: Array, lengths: Array, *, scale: float, softcap: float | None
) -> Array:
    """Split-K decoding on TPU (Pallas Mosaic); see the module docstring. Returns o [B,H,D]."""
    _check(q, k_cache, "pallas_tpu decode_attention")
    return _decode_tpu_vjp(q, k_cache, v_cache, lengths, scale, softcap)


__all__ = ["decode_attention_tpu", "decode_attention_triton", "gpu_num_splits"]
