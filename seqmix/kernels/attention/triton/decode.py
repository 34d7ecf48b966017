"""Split-K decoding attention over a KV cache (flash-decoding) in Pallas Triton.

``decode_attention(q, k_cache, v_cache, lengths, *, scale, softcap)`` computes, for each row
``b`` and query head ``h`` (KV head ``h // G``, ``G = H / Hkv``)::

    o[b, h] = sum_{s < lengths[b]} softmax_s(cap(scale * q[b,h] . k[b,s,h//G])) v[b,s,h//G]

with ``q [B,H,D]``, caches ``[B,S,Hkv,D]`` read in their own layout and dtype, ``lengths [B]``
ints (clipped to ``[0, S]``), ``o [B,H,D]`` in q's dtype, 0 for a row of length 0.

The reduction over the cache is split (flash-decoding; Lean Attention's stream-K view of the
same reduction): row ``b``'s ``ceil(lengths[b] / block_k)`` key blocks are dealt in equal
contiguous chunks to ``num_splits`` programs, so every program of a row does the same work
and the cost follows the length, not the cache size (blocks past the length are never read).
Each program returns unnormalised partials ``(o_j, m_j, l_j)`` (float32); an XLA epilogue
(``reference.combine_splits``) merges them.

Grid ``(B, Hkv, num_splits)``; a program holds the G query heads of its KV head as a
``[G -> 16, D]`` tile (the tensor-core minimum), so each K/V block ``[block_k, D]`` is read
from HBM once per group (16-byte vector loads along D: D is contiguous in the cache) and
feeds one ``[16,D] x [D,block_k]`` and one ``[16,block_k] x [block_k,D]`` dot.
``num_splits`` is chosen from S and the SM count so that ``B * Hkv * num_splits`` covers the
SMs many times over (B = 4, Hkv = 8 at S = 128k: 64 splits of 2048 keys = 2048 programs,
8-16 waves of 1-2 resident programs per SM on an H200, so the wave tail is small).
``block_k``, warps and stages come from ``tuning.py``. Memory roofline: 128k x 8 heads x
128 x 2 B x 2 (K, V) = 537 MB per row; the partials (B x Hkv x splits x 16 x (D + 2) x 4 B)
add <1%. Measured speed: BENCHMARKS.md (decode_attention).

Gradients: the kernel is forward-only; ``jax.grad`` goes through a custom_vjp whose backward
is the VJP of ``reference.decode_attention_xla`` (exact, materialises [B,H,S] logits).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from seqmix.kernels import common
from seqmix.kernels.attention import reference, tuning
from seqmix.kernels.common import cdiv
from seqmix.kernels.dispatch import interpret_mode

Array = jax.Array

# --- GPU: block_k, warps and stages come from attention/tuning.py ("decode" rows); the split
# policy is this module's: ~KEYS_PER_SPLIT keys per program, >= 4 programs per SM.
KEYS_PER_SPLIT = 2048
GPU_DEFAULT_SMS = 132  # H200 / H100 SXM
MAX_SPLITS = 1024


def _num_sms() -> int:
    if jax.default_backend() == "gpu":
        return int(getattr(jax.devices()[0], "core_count", GPU_DEFAULT_SMS) or GPU_DEFAULT_SMS)
    return GPU_DEFAULT_SMS  # lowering for the H200 on a CPU


def gpu_num_splits(
    B: int, Hkv: int, S: int, block_k: int, keys_per_split: int, num_sms: int
) -> int:
    """Splits per row: ~``keys_per_split`` keys each, at least 4 programs per SM when S
    allows, at most one split per key block and ``MAX_SPLITS``."""
    want = max(cdiv(S, keys_per_split), cdiv(4 * num_sms, B * Hkv))
    return max(1, min(want, cdiv(S, block_k), MAX_SPLITS))


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
    precision,
):
    split = pl.program_id(2)
    length = jnp.clip(len_ref[...], 0, seq_len)
    n_blocks = cdiv(length, block_k)
    per_split = cdiv(n_blocks, num_splits)
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
        s = reference.cap_logits(
            plgpu.dot(q, k, trans_b=True, precision=precision) * scale, softcap
        )  # [Gp, block_k] f32
        s = jnp.where(valid[None, :], s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))  # finite: each block has a valid key
        alpha = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new[:, None])
        l = alpha * l + jnp.sum(p, axis=1)
        v = plgpu.load(v_ref.at[pl.ds(start, block_k), :], mask=vmask, other=0.0)
        o = alpha[:, None] * o + plgpu.dot(p.astype(v.dtype), v, precision=precision)
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
    config: tuning.TritonDecodeConfig,
):
    B, H, D = q.shape
    S, Hkv = k_cache.shape[1], k_cache.shape[2]
    G = H // Hkv
    if D < 16 or D & (D - 1):
        raise NotImplementedError(
            f"pallas_triton decode_attention needs a power-of-two head_dim >= 16, got {D}"
        )
    tile = tuning.attention_blocks(D, k_cache.dtype, kind="decode", interpret=interpret_mode())
    bk = config.block_k
    # interpret mode: few splits of a few blocks each, so every code path runs at test shapes
    keys_per_split = 4 * bk if interpret_mode() else KEYS_PER_SPLIT
    n_split = config.num_splits or gpu_num_splits(
        B, Hkv, S, bk, keys_per_split, 1 if interpret_mode() else _num_sms()
    )
    Gp = max(tile.block_q, 1 << (G - 1).bit_length())  # query heads of a group, >= 16
    cdt = k_cache.dtype
    qg = q.reshape(B, Hkv, G, D).astype(cdt)
    if Gp != G:
        qg = jnp.pad(qg, ((0, 0), (0, 0), (0, Gp - G), (0, 0)))
    kernel = functools.partial(
        _triton_kernel,
        scale=scale,
        softcap=softcap,
        block_k=bk,
        num_splits=n_split,
        seq_len=S,
        # float32 caches: full-precision dots (not TF32), as the flash kernels
        precision=lax.Precision.HIGHEST if cdt == jnp.float32 else None,
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
            num_warps=config.num_warps,
            num_stages=config.num_stages,
        ),
        interpret=interpret_mode(),
        name="seqmix_decode_split_k",
    )(lengths.astype(jnp.int32), qg, k_cache, v_cache)
    o = reference.combine_splits(o[:, :, :, :G], m[:, :, :, :G], l[:, :, :, :G], q.dtype)
    return o.reshape(B, H, D)


_decode_triton_vjp = reference.with_reference_vjp(_decode_triton)


def decode_attention(
    q: Array,
    k_cache: Array,
    v_cache: Array,
    lengths: Array,
    *,
    scale: float,
    softcap: float | None,
    config: tuning.TritonDecodeConfig | None = None,
) -> Array:
    """Flash-decoding on GPU (Pallas Triton); see the module docstring. Returns o [B,H,D].
    ``config``: ``tuning.TritonDecodeConfig`` (None: the table's)."""
    common.no_float64(q, k_cache)
    cfg = tuning.triton_decode_config(
        config, q.shape[-1], k_cache.dtype, interpret=interpret_mode()
    )
    return _decode_triton_vjp(q, k_cache, v_cache, lengths, scale, softcap, cfg)
