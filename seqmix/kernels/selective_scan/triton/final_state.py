"""The backward of a selective-scan block's final state from zero, as one Pallas Triton
kernel: the gradients of ``h = sum_t exp(A R_t) w_t B_t`` (``[B, Dm, N]``; ``R_t`` the dt
of the later tokens, ``w_t = dt_t u_t``), the reduction that the context-parallel scan
(``seqmix.parallel.selective_scan.block_final_state``) runs on every device.

Given ``G = dL/dh`` and ``P_t = G * exp(A R_t)`` (``[Dm, N]`` per token):

- ``dL/dw_t = sum_n P_t B_t``  and  ``dL/dR_t = w_t sum_n A P_t B_t``  (``[B, T, Dm]``);
- ``dL/dB_t = sum_d P_t w_t``  over the channels of B's group (``[B, T, G, N]``);
- ``dL/dA = sum_t R_t P_t w_t B_t``  (``[Dm, N]``).

No term depends on another token: one program per (batch row, ``block_d`` channels,
``steps`` tiles of ``block_t`` tokens) loads each ``[block_t, block_d]`` tile of R and w once
and walks the N states, each a tile of ``exp2`` and a few products held in registers. The
sums over channels (dB) leave each program as partial rows, and the sums over tokens (dA)
as one partial ``[N, block_d]`` per program (accumulated over its tiles), which XLA adds
(``[B, Dm / block_d, T, N]`` and ``[B, T / (steps block_t), N, Dm]`` float32), so nothing of
size ``[T, Dm, N]`` reaches memory. The XLA form of the same gradients (a loop over chunks
of tokens) materialises and re-reads such chunks several times over.

Bytes at one 125M Mamba-1 layer's block of 32k tokens (``[1, 32768, 1536, 16]``): R and w
read once and the two ``[T, Dm]`` gradients written once, float32, 0.8 GB, plus the partials
(dB 0.05 GB at ``block_d`` 64, dA 0.01 GB at 256 tokens a program); work: one ``exp2`` and
~8 multiply-adds per ``(t, d, n)``, 0.8G of each.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from seqmix.kernels.selective_scan.triton.tiles import pow2_divisor

Array = jax.Array
_LOG2E = math.log2(math.e)


@dataclasses.dataclass(frozen=True)
class FinalStateTiles:
    """A program's tile of tokens and channels (powers of two; ``block_d`` is shrunk to
    divide the channels of one group), the tiles it walks in turn (``steps``: its tokens are
    ``steps x block_t``), and warps. Not measured on a GPU yet: 32 x 64 float32 tiles at 4
    warps hold 16 values a thread per tile, about 8 tiles live; 256 tokens a program leave
    3072 programs at 32k tokens of 1536 channels."""

    block_t: int = 32
    block_d: int = 64
    steps: int = 8
    num_warps: int = 4


GPU_TILES = FinalStateTiles()
INTERPRET_TILES = FinalStateTiles(block_t=8, block_d=4, steps=2, num_warps=1)


def final_state_grads(
    later: Array,
    w: Array,
    B: Array,
    A: Array,
    g: Array,
    *,
    tiles: FinalStateTiles | None = None,
    interpret: bool = False,
) -> tuple[Array, Array, Array, Array]:
    """``(dL/dw, dL/dR, dL/dB, dL/dA)`` of ``h = sum_t exp(A R_t) w_t B_t`` given ``g =
    dL/dh``.

    Args:
      later: ``R [B, T, Dm]`` float32, the dt of the tokens after each one.
      w: ``dt u`` as ``[B, T, Dm]`` float32.
      B: ``[B, T, G, N]`` (channel ``d`` reads group ``d // (Dm // G)``).
      A: ``[Dm, N]``; g: ``[B, Dm, N]``.
      tiles: None: ``GPU_TILES``, or ``INTERPRET_TILES`` in interpret mode.

    Returns:
      float32 ``[B, T, Dm]``, ``[B, T, Dm]``, ``[B, T, G, N]``, ``[Dm, N]``.
    """
    if tiles is None:
        tiles = INTERPRET_TILES if interpret else GPU_TILES
    Bsz, T, Dm = later.shape
    G, N = B.shape[2], B.shape[3]
    per = Dm // G  # channels per group
    bd = pow2_divisor(per, tiles.block_d)
    bt = min(tiles.block_t, pl.next_power_of_2(T))
    steps = max(1, min(tiles.steps, pl.cdiv(T, bt)))
    nd, nt = Dm // bd, pl.cdiv(T, bt * steps)

    def kernel(r_ref, w_ref, b_ref, at_ref, gt_ref, dw_ref, dr_ref, db_ref, da_ref):
        b, j, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
        cols = j * bd + jnp.arange(bd)
        grp = (j * bd) // per
        # the program's rows of A^T (natural and log2 e scaled) and of the cotangent
        a = [plgpu.load(at_ref.at[n, cols]).astype(jnp.float32)[None, :] for n in range(N)]
        a2 = [x * _LOG2E for x in a]
        gn = [plgpu.load(gt_ref.at[b, n, cols]).astype(jnp.float32)[None, :] for n in range(N)]

        def step(s, d_a):
            t = (i * steps + s) * bt + jnp.arange(bt)
            rows, ok = t[:, None], (t < T)[:, None]
            tile = lambda ref: plgpu.load(ref.at[b, rows, cols[None, :]], mask=ok, other=0.0)
            R = tile(r_ref).astype(jnp.float32)
            wt = tile(w_ref).astype(jnp.float32)  # 0 past T: no padded token adds to dA, dB
            s_w = jnp.zeros((bt, bd), jnp.float32)
            s_r = jnp.zeros((bt, bd), jnp.float32)
            out = []
            for n in range(N):
                bn = plgpu.load(b_ref.at[b, t, grp, n], mask=t < T, other=0.0)
                eg = jnp.exp2(R * a2[n]) * gn[n]  # P_t for state n
                egb = eg * bn.astype(jnp.float32)[:, None]
                s_w = s_w + egb
                s_r = s_r + egb * a[n]
                out.append(d_a[n] + jnp.sum(R * wt * egb, axis=0))
                plgpu.store(db_ref.at[b, j, t, n], jnp.sum(eg * wt, axis=1), mask=t < T)
            plgpu.store(dw_ref.at[b, rows, cols[None, :]], s_w, mask=ok)
            plgpu.store(dr_ref.at[b, rows, cols[None, :]], s_r * wt, mask=ok)
            return tuple(out)

        zero = tuple(jnp.zeros((bd,), jnp.float32) for _ in range(N))
        d_a = jax.lax.fori_loop(0, steps, step, zero)
        for n in range(N):
            plgpu.store(da_ref.at[b, i, n, cols], d_a[n])

    f32 = jnp.float32
    d_w, d_r, db_part, da_part = pl.pallas_call(
        kernel,
        grid=(Bsz, nd, nt),
        out_shape=(
            jax.ShapeDtypeStruct((Bsz, T, Dm), f32),
            jax.ShapeDtypeStruct((Bsz, T, Dm), f32),
            jax.ShapeDtypeStruct((Bsz, nd, T, N), f32),
            jax.ShapeDtypeStruct((Bsz, nt, N, Dm), f32),
        ),
        interpret=interpret,
        compiler_params=plgpu.CompilerParams(num_warps=tiles.num_warps, num_stages=1),
        name="selective_scan_final_state_bwd",
    )(later, w, B, jnp.swapaxes(A, 0, 1).astype(f32), jnp.swapaxes(g, 1, 2).astype(f32))
    d_B = jnp.moveaxis(db_part.reshape(Bsz, G, nd // G, T, N).sum(axis=2), 1, 2)
    d_A = jnp.swapaxes(da_part.sum(axis=(0, 1)), 0, 1)
    return d_w, d_r, d_B, d_A
