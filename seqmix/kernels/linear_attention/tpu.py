"""Chunked gated linear attention as Pallas Mosaic TPU kernels, forward and backward.

Computes (reference.py's contract) ``S_t = exp(g_t) * S_{t-1} + k_t v_t^T`` and
``o_t = scale * q_t^T S_t`` with the state reset wherever the run id changes. The math of
one chunk lives in tpu_chunk.py; this module holds the kernels, their wiring and the VJP.

Algorithm. The three stages of ``reference.linear_attention_xla`` fuse into one kernel:
the grid is ``(B, Hv, blocks)``, the block axis sequential ('arbitrary'); a block holds
``m`` chunks of ``C`` tokens (about 1024 tokens, so that the ~0.35 us cost of a grid step
is amortised) and the kernel walks them with a ``fori_loop`` while the state ``S [K, V]``
(float32) stays in VMEM scratch across chunks and blocks. With ``b`` the inclusive cumsum of
``g`` inside a chunk (``b <= 0``, non-increasing) and ``b_L`` its last value, per chunk:

    o   = scale * ((q * exp(b)) @ S + (mask(q k^T) * exp(b_t - b_s)) @ v)
    S  <- exp(b_L) * S + (k * exp(b_L - b))^T @ v

Every ``exp`` is of a non-positive number (clamped at 0 against rounding); pairs ``s > t``
are masked before the ``exp``. ``b`` is kept as a compensated float32 pair ``hi + lo``:
under strong decay ``|b|`` reaches ``20 C`` and a plain float32 ``b_t - b_s`` would lose
``eps |b|`` (a 1e-5 relative error on decay factors already at C = 32, the dominant error
of d log_decay); with the pair it is as exact as the oracle's step-by-step decay. (We do
not use a ``tril(1) @ g`` MXU matmul: it has the same cancellation and costs 6 MXU
passes at float32 precision.)

* Scalar decay (per head): the chunk-local prefix sums are computed in XLA (4 bytes per
  token and head) and enter as ``[.., chunks, C]`` row blocks; the ``[C, C]`` decay
  matrix is formed directly.
* Per-channel decay (GLA): ``b`` by a log-step scan of sublane rolls in the kernel. The
  intra-chunk scores use sub-chunks of ``c = 16`` tokens: a query sub-chunk after key
  sub-chunk ``j`` factors with the reference ``r = b`` at the end of sub-chunk ``j``,
  ``(q_t exp(b_t - r)) . (k_s exp(r - b_s))``, both factors ``<= 1`` (one MXU matmul per
  ``j``); the diagonal ``c x c`` sub-blocks use an explicit per-channel decay
  ``exp(b_t - b_s)`` (``c`` exponentials of ``[c, K]`` each). We chose sub-chunks over the
  plain ``[C, C, K]`` tensor because it is ``C / c = 4`` times fewer exponentials at
  ``C = 64`` and keeps the VMEM temporaries at ``[c, K]``.
* Segments (``runs``): the kernel receives run ids relative to the run of the token before
  the chunk; pairs across runs are masked, the state entering the chunk reaches only
  tokens of that run (relative id 0), only tokens of the chunk's last run write into the
  state leaving it, and the carried state is zeroed when the last run is not run 0.

Backward (``jax.custom_vjp``; dq, dk, dv, d log_decay, d initial_state): one reverse kernel
over blocks holding ``dS = dL/dS_out`` in VMEM. The forward (when differentiated) stores
the state entering every *block* as a residual ``[B, Hv, blocks, K, V]`` float32; the
backward recomputes the ``m`` chunk-entry states of a block from the k, v, g it has in
VMEM anyway (one ``[K, C] @ [C, V]`` matmul per chunk), then walks the chunks in reverse.
Storing every chunk state instead would add ``4 K V / C`` bytes per token (1 KiB at
K = V = 128, C = 64: as much as q, k, v and o together); per block it is 64 B per token,
and the recompute costs only MXU time, no HBM traffic. Every term of a chunk depends on
``b`` only through ``exp(b_t - b_s)``, ``exp(b_t)``, ``exp(b_L - b_s)`` or ``exp(b_L)``,
which gives the decay gradient (per channel; summed over K for scalar decay)

    dg_u = sum_{t >= u} (q_t dq'_t - k_t dk'_t) + sum_{s < u} k_s dk^S_s
           + carry * exp(b_L) (S_in * dS).sum(V)

where ``dk^S`` is the state-output part of dk, ``dq'`` and ``dk'`` leave out the ``s = t``
pairs and ``dk'`` also leaves out ``dk^S``. The textbook form ``revcumsum(q dq - k dk) +
(S_out * dS).sum(V)`` is the same number, but it adds and then cancels those undecayed
terms, which leaves rounding noise far above a small d log_decay under strong decay.

Layout. ``[B, T, H, D]`` is viewed as ``[B, T, H * D]`` (free) so a ``(C', D)`` block picks
one head, and ``index_map`` picks the q/k head ``h // rep`` for v head ``h`` (q and k are
never repeated; their gradients come out per v head and are summed over the group).
``K`` and ``V`` are zero-padded to multiples of 128 (exact: padded channels have
``k = 0``, ``g = 0``), ``T`` to whole blocks. States, decay sums and accumulators are
float32; matmul operands follow tpu_chunk's policy (raw bf16 inputs exact, float32
intermediates split into bf16 hi + lo; fp16/fp32 at float32 precision).

Roofline (per token and head, K = V = 128, C = 64, bf16; counting MXU work in bf16
passes). Forward: ``q k^T`` (16 kFLOP, 1 pass), ``q S``, ``k~^T v`` (32 kFLOP each, 2
passes), ``A v`` (16 kFLOP, 2 passes): 176 kFLOP of MXU time; HBM traffic is q, k, v, o =
1024 B (+ 8 B scalar or 512 B per-channel decay; + 64 B of block states when
differentiated). v5e (197 TFLOP/s, 819 GB/s): 0.9 ns compute vs 1.25 ns memory, so
bandwidth-bound at ~1.25 ns per token-head, ~0.66 ms for [8, 4096, 16, 128]. v5p
(459 TFLOP/s, 2765 GB/s): 0.38 vs 0.37 ns, balanced, ~0.2 ms. Backward: ~464 kFLOP of
passes (state recompute included) over ~1.9 KB: v5e ~2.4 ns (balanced), v5p ~1.0 ns
(MXU-bound). Per-channel decay adds ``c K = 2048`` exponentials and ~20 k elementwise
VPU ops per token forward (x2 backward) for the diagonal sub-blocks: at the order of 5
T elementwise ops/s this is ~2x the memory time on v5e and dominates on v5p; expect
per-channel at 2-3x the scalar-decay time. A block of 1024 tokens moves 1 MiB per head:
1.3 us on v5e, 0.4 us on v5p, so the per-step overhead is hidden on v5e and marginal on
v5p. D = 64 is padded to 128: twice the traffic of q, k (v, o), expect ~2x the ideal
time. Nothing here has run on a TPU yet: the kernels are checked in interpret mode and
by lowering to Mosaic (``seqmix.testing.lower_for``), which does not run Mosaic's own
layout passes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from seqmix.kernels.dispatch import interpret_mode
from seqmix.kernels.linear_attention import tpu_chunk as tc
from seqmix.kernels.linear_attention.tpu_chunk import KernelConfig

F32 = jnp.float32
LANES = 128
SUB_CHUNK = 16
TOKENS_PER_STEP = 1024


# --- forward kernel ------------------------------------------------------------------------------


_N_DEC = {"none": 0, "scalar": 2, "channel": 1}  # decay inputs: -, (b hi, b lo) rows, g


def _fwd_kernel(cfg: KernelConfig, save: bool, *refs):
    refs = list(refs)
    q_ref, k_ref, v_ref = refs[:3]
    pos = 3
    rel_ref = s0_ref = st_ref = None
    dec_refs, pos = refs[pos : pos + _N_DEC[cfg.kind]], pos + _N_DEC[cfg.kind]
    if cfg.has_runs:
        rel_ref, pos = refs[pos], pos + 1
    if cfg.has_init:
        s0_ref, pos = refs[pos], pos + 1
    o_ref, final_ref = refs[pos], refs[pos + 1]
    pos += 2
    if save:
        st_ref, pos = refs[pos], pos + 1
    s_scr, *chan = refs[pos:]
    C = cfg.chunk
    j = pl.program_id(2)

    @pl.when(j == 0)
    def _init():
        s_scr[...] = s0_ref[...] if s0_ref is not None else jnp.zeros(s_scr.shape, F32)

    if save:
        st_ref[...] = s_scr[...]
    b_rows = [r[...] for r in dec_refs] if cfg.kind == "scalar" else None
    rel_rows = rel_ref[...] if rel_ref is not None else None

    def body(i, carry):
        sl = pl.ds(pl.multiple_of(i * C, C), C)
        q, k, v = q_ref[sl, :], k_ref[sl, :], v_ref[sl, :]
        S = s_scr[...]
        msk = tc.masks(C, rel_rows, i)
        if cfg.kind == "channel":
            o, S_out = tc.forward_channel(cfg, q, k, v, dec_refs[0][sl, :], S, msk, *chan)
            s_scr[...] = S_out
        else:
            dec = tc.scalar_decay(*b_rows, i) if cfg.kind == "scalar" else None
            o = tc.forward_scalar(cfg, q, k, v, S, dec, msk)
            s_scr[...] = tc.state_out(cfg, S, k, v, None, dec, msk)
        o_ref[sl, :] = o.astype(o_ref.dtype)
        return carry

    lax.fori_loop(0, jnp.minimum(cfg.m, cfg.n - j * cfg.m), body, 0)

    @pl.when(j == cfg.blocks - 1)
    def _final():
        final_ref[...] = s_scr[...]


# --- backward kernel -----------------------------------------------------------------------------


def _bwd_kernel(cfg: KernelConfig, *refs):
    refs = list(refs)
    q_ref, k_ref, v_ref = refs[:3]
    pos = 3
    rel_ref = dg_ref = ds0_ref = None
    dec_refs, pos = refs[pos : pos + _N_DEC[cfg.kind]], pos + _N_DEC[cfg.kind]
    if cfg.has_runs:
        rel_ref, pos = refs[pos], pos + 1
    do_ref, st_ref, dfinal_ref, dq_ref, dk_ref, dv_ref = refs[pos : pos + 6]
    pos += 6
    if cfg.kind != "none":
        dg_ref, pos = refs[pos], pos + 1
    if cfg.has_init:
        ds0_ref, pos = refs[pos], pos + 1
    ds_scr, s_blk, *chan = refs[pos:]
    C = cfg.chunk
    j = pl.program_id(2)
    blk = cfg.blocks - 1 - j
    nvalid = jnp.minimum(cfg.m, cfg.n - blk * cfg.m)

    @pl.when(j == 0)
    def _init():
        ds_scr[...] = dfinal_ref[...]

    b_rows = [r[...] for r in dec_refs] if cfg.kind == "scalar" else None
    rel_rows = rel_ref[...] if rel_ref is not None else None

    def chunk(i):
        sl = pl.ds(pl.multiple_of(i * C, C), C)
        dec = tc.scalar_decay(*b_rows, i) if cfg.kind == "scalar" else None
        g = dec_refs[0][sl, :] if cfg.kind == "channel" else None
        return sl, k_ref[sl, :], v_ref[sl, :], g, dec, tc.masks(C, rel_rows, i)

    # 1. The state entering every chunk of the block, from the block's entering state.
    s_blk[0] = st_ref[...]

    def fwd_body(i, carry):
        _, k, v, g, dec, msk = chunk(i)
        s_blk[i + 1] = tc.state_out(cfg, s_blk[i], k, v, g, dec, msk)
        return carry

    lax.fori_loop(0, nvalid - 1, fwd_body, 0)

    # 2. Chunks in reverse, carrying dS = dL/dS_out.
    def bwd_body(ii, dg_rows):
        i = nvalid - 1 - ii
        sl, k, v, g, dec, msk = chunk(i)
        q, do, S, dS = q_ref[sl, :], do_ref[sl, :], s_blk[i], ds_scr[...]
        if cfg.kind == "channel":
            dq, dk, dv, dg, dS_in = tc.backward_channel(cfg, q, k, v, do, g, S, dS, msk, chan)
            dg_ref[sl, :] = dg
        else:
            dq, dk, dv, dg, dS_in = tc.backward_scalar(cfg, q, k, v, do, S, dS, dec, msk)
            if dg is not None:
                dg_rows = jnp.where(tc.iota(dg_rows.shape, 0) == i, dg, dg_rows)
        dq_ref[sl, :] = dq.astype(dq_ref.dtype)
        dk_ref[sl, :] = dk.astype(dk_ref.dtype)
        dv_ref[sl, :] = dv.astype(dv_ref.dtype)
        ds_scr[...] = dS_in
        return dg_rows

    dg_rows = lax.fori_loop(0, nvalid, bwd_body, jnp.zeros((cfg.m, C), F32))
    if cfg.kind == "scalar":
        dg_ref[...] = dg_rows
    if ds0_ref is not None:

        @pl.when(j == cfg.blocks - 1)
        def _ds0():
            ds0_ref[...] = ds_scr[...]


# --- pallas_call wiring --------------------------------------------------------------------------


def _specs(cfg: KernelConfig, reverse: bool):
    """BlockSpecs of the laid-out operands; ``reverse`` walks the blocks backwards."""
    C, m, rep = cfg.chunk, cfg.m, cfg.rep
    last = cfg.blocks - 1

    def blk(j):
        return last - j if reverse else j

    tok = m * C
    qk = pl.BlockSpec((None, tok, cfg.kp), lambda b, h, j: (b, blk(j), h // rep))
    k_per_v = pl.BlockSpec((None, tok, cfg.kp), lambda b, h, j: (b, blk(j), h))  # dq, dk, g
    vv = pl.BlockSpec((None, tok, cfg.vp), lambda b, h, j: (b, blk(j), h))
    rows_h = pl.BlockSpec((None, None, m, C), lambda b, h, j: (b, h, blk(j), 0))
    rows = pl.BlockSpec((None, m, C), lambda b, h, j: (b, blk(j), 0))
    state = pl.BlockSpec((None, None, cfg.kp, cfg.vp), lambda b, h, j: (b, h, 0, 0))
    block_state = pl.BlockSpec(
        (None, None, None, cfg.kp, cfg.vp), lambda b, h, j: (b, h, blk(j), 0, 0)
    )
    g = None if cfg.kind == "none" else (rows_h if cfg.kind == "scalar" else k_per_v)
    return dict(qk=qk, k_per_v=k_per_v, v=vv, g=g, rows=rows, state=state, block_state=block_state)


def _compiler_params(cfg: KernelConfig, vmem_bytes: int):
    limit = min(max(int(vmem_bytes * 1.5) + (8 << 20), 32 << 20), 64 << 20)
    return pltpu.CompilerParams(
        dimension_semantics=("parallel", "parallel", "arbitrary"), vmem_limit_bytes=limit
    )


def _interpret(cfg: KernelConfig):
    return pltpu.InterpretParams(detect_races=True) if cfg.interpret else False


def _vmem_estimate(cfg: KernelConfig, backward: bool) -> int:
    tok, isz = cfg.m * cfg.chunk, jnp.dtype(cfg.dtype).itemsize
    kv = cfg.kp * cfg.vp * 4
    per_tok = (2 * cfg.kp + cfg.vp) * isz + (cfg.kp * 4 if cfg.kind == "channel" else 8)
    if backward:
        dqk = 4 if cfg.rep > 1 else isz
        per_tok += cfg.vp * isz + 2 * cfg.kp * dqk + cfg.vp * isz
        per_tok += cfg.kp * 4 if cfg.kind == "channel" else 4
        return 2 * tok * per_tok + (cfg.m + 4) * kv + 8 * cfg.chunk * (cfg.kp + cfg.vp) * 4
    per_tok += cfg.vp * isz
    return 2 * tok * per_tok + 5 * kv + 4 * cfg.chunk * (cfg.kp + cfg.vp) * 4


def _decay_inputs(cfg: KernelConfig, g):
    """The kernels' decay operands: g per channel, or the chunk-local compensated prefix
    sums (hi, lo) of scalar g, computed here in XLA (4 bytes per token and head)."""
    if cfg.kind == "none":
        return []
    return [g] if cfg.kind == "channel" else list(tc.chunk_prefix_sums(g))


def _forward(cfg: KernelConfig, q, k, v, g, s0, rel, save: bool):
    B, Tp = q.shape[:2]
    sp = _specs(cfg, reverse=False)
    in_specs, args = [sp["qk"], sp["qk"], sp["v"]], [q, k, v]
    for x in _decay_inputs(cfg, g):
        in_specs.append(sp["g"])
        args.append(x)
    for spec, x in ((sp["rows"], rel), (sp["state"], s0)):
        if x is not None:
            in_specs.append(spec)
            args.append(x)
    out_shape = [
        jax.ShapeDtypeStruct((B, Tp, cfg.hv * cfg.vp), jnp.dtype(cfg.dtype)),
        jax.ShapeDtypeStruct((B, cfg.hv, cfg.kp, cfg.vp), F32),
    ]
    out_specs = [sp["v"], sp["state"]]
    if save:
        out_shape.append(jax.ShapeDtypeStruct((B, cfg.hv, cfg.blocks, cfg.kp, cfg.vp), F32))
        out_specs.append(sp["block_state"])
    scratch = [pltpu.VMEM((cfg.kp, cfg.vp), F32)]
    if cfg.kind == "channel":
        scratch += [pltpu.VMEM((cfg.chunk, cfg.vp), F32)] + [
            pltpu.VMEM((cfg.chunk, cfg.kp), F32)
        ] * 3
    outs = pl.pallas_call(
        functools.partial(_fwd_kernel, cfg, save),
        grid=(B, cfg.hv, cfg.blocks),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        scratch_shapes=scratch,
        compiler_params=_compiler_params(cfg, _vmem_estimate(cfg, backward=False)),
        interpret=_interpret(cfg),
        name="linear_attention_fwd",
    )(*args)
    return outs[0], outs[1], (outs[2] if save else None)


def _backward(cfg: KernelConfig, q, k, v, g, rel, states, do, dfinal):
    B, Tp = q.shape[:2]
    sp = _specs(cfg, reverse=True)
    in_specs, args = [sp["qk"], sp["qk"], sp["v"]], [q, k, v]
    for x in _decay_inputs(cfg, g):
        in_specs.append(sp["g"])
        args.append(x)
    if rel is not None:
        in_specs.append(sp["rows"])
        args.append(rel)
    in_specs += [sp["v"], sp["block_state"], sp["state"]]
    args += [do, states, dfinal]
    dqk_dtype = F32 if cfg.rep > 1 else jnp.dtype(cfg.dtype)
    out_shape = [jax.ShapeDtypeStruct((B, Tp, cfg.hv * cfg.kp), dqk_dtype)] * 2 + [
        jax.ShapeDtypeStruct((B, Tp, cfg.hv * cfg.vp), jnp.dtype(cfg.dtype))
    ]
    out_specs = [sp["k_per_v"], sp["k_per_v"], sp["v"]]
    if g is not None:
        out_shape.append(jax.ShapeDtypeStruct(g.shape, F32))
        out_specs.append(sp["g"])
    if cfg.has_init:
        out_shape.append(jax.ShapeDtypeStruct((B, cfg.hv, cfg.kp, cfg.vp), F32))
        out_specs.append(sp["state"])
    scratch = [pltpu.VMEM((cfg.kp, cfg.vp), F32), pltpu.VMEM((cfg.m, cfg.kp, cfg.vp), F32)]
    if cfg.kind == "channel":
        C = cfg.chunk
        scratch += [
            pltpu.VMEM((C, cfg.kp), F32),
            pltpu.VMEM((C, cfg.kp), F32),
            pltpu.VMEM((C, cfg.vp), F32),
        ] + [pltpu.VMEM((C, cfg.kp), F32)] * 4
    outs = pl.pallas_call(
        functools.partial(_bwd_kernel, cfg),
        grid=(B, cfg.hv, cfg.blocks),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        scratch_shapes=scratch,
        compiler_params=_compiler_params(cfg, _vmem_estimate(cfg, backward=True)),
        interpret=_interpret(cfg),
        name="linear_attention_bwd",
    )(*args)
    dq, dk, dv = outs[:3]
    outs = list(outs[3:])
    dg = outs.pop(0) if g is not None else None
    ds0 = outs.pop(0) if cfg.has_init else None
    if cfg.rep > 1:  # v heads of one group share q/k: sum their contributions

        def group_sum(x):
            x = x.reshape(B, Tp, cfg.hv // cfg.rep, cfg.rep, cfg.kp).sum(axis=3)
            return x.reshape(B, Tp, -1).astype(cfg.dtype)

        dq, dk = group_sum(dq), group_sum(dk)
    return dq, dk, dv, dg, ds0


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _core(cfg, q, k, v, g, s0, rel):
    o, final, _ = _forward(cfg, q, k, v, g, s0, rel, save=False)
    return o, final


def _core_fwd(cfg, q, k, v, g, s0, rel):
    o, final, states = _forward(cfg, q, k, v, g, s0, rel, save=True)
    return (o, final), (q, k, v, g, rel, states)


def _core_bwd(cfg, res, cts):
    q, k, v, g, rel, states = res
    do, dfinal = cts
    dq, dk, dv, dg, ds0 = _backward(
        cfg, q, k, v, g, rel, states, do.astype(cfg.dtype), dfinal.astype(F32)
    )
    return dq, dk, dv, dg, ds0, None


_core.defvjp(_core_fwd, _core_bwd)


# --- layout and entry point ----------------------------------------------------------------------


def _round_up(x: int, n: int) -> int:
    return -(-x // n) * n


def _pad(x, axis_sizes):
    return jnp.pad(x, [(0, s - d) for d, s in zip(x.shape, axis_sizes)])


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
    sub_chunk: int = SUB_CHUNK,
    chunks_per_step: int | None = None,
):
    """Chunked gated linear attention on a TPU (reference.py's normalised contract).

    Args:
      q, k: ``[B, T, Hqk, K]``; v: ``[B, T, Hv, V]``, bf16/fp16/fp32 (one dtype).
      g: None, ``[B, T, Hv]`` or ``[B, T, Hv, K]`` float32 log decays (<= 0).
      scale: float. initial_state: float32 ``[B, Hv, K, V]`` or None.
      runs: None or ``[B, T]`` int32 non-decreasing run ids (the state resets where the id
        changes).
      chunk_size: C, a multiple of 16 (the bf16 sublane tile).
      sub_chunk: c, the per-channel diagonal sub-block (dividing C; a multiple of 16 for
        16-bit inputs, of 8 for float32).
      chunks_per_step: chunks per grid step (a multiple of 8 unless the sequence fits in
        one step); default about 1024 tokens.

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
    sub = min(sub_chunk, C)
    tile = 16 if dtype.itemsize == 2 else 8  # rows of a (sublane x lane) tile
    if sub % tile or C % sub:
        raise NotImplementedError(
            f"sub_chunk must be a multiple of {tile} dividing chunk_size {C}, got {sub_chunk}"
        )
    B, T, Hqk, K = q.shape
    Hv, V = v.shape[2], v.shape[3]
    n = -(-T // C)
    m = chunks_per_step or _round_up(max(1, TOKENS_PER_STEP // C), 8)
    if m >= n:
        m = n
    elif m % 8:
        raise NotImplementedError(f"chunks_per_step must be a multiple of 8, got {m}")
    blocks = -(-n // m)
    Tp, Kp, Vp = blocks * m * C, _round_up(K, LANES), _round_up(V, LANES)
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

    qp = _pad(q, (B, Tp, Hqk, Kp)).reshape(B, Tp, Hqk * Kp)
    kp = _pad(k, (B, Tp, Hqk, Kp)).reshape(B, Tp, Hqk * Kp)
    vp = _pad(v, (B, Tp, Hv, Vp)).reshape(B, Tp, Hv * Vp)
    gp = None
    if kind == "scalar":  # [B, Hv, chunks, C] rows
        gp = _pad(g.astype(F32), (B, Tp, Hv)).reshape(B, blocks * m, C, Hv).transpose(0, 3, 1, 2)
    elif kind == "channel":
        gp = _pad(g.astype(F32), (B, Tp, Hv, Kp)).reshape(B, Tp, Hv * Kp)
    rel = None
    if runs is not None:  # run ids relative to the run of the token before each chunk
        r = jnp.pad(runs.astype(jnp.int32), [(0, 0), (0, Tp - T)], mode="edge")
        r = r.reshape(B, blocks * m, C)
        prev = jnp.concatenate([r[:, :1, 0], r[:, :-1, -1]], axis=1)
        rel = (r - prev[:, :, None]).astype(F32)
    s0 = None if initial_state is None else _pad(initial_state.astype(F32), (B, Hv, Kp, Vp))
    o, final = _core(cfg, qp, kp, vp, gp, s0, rel)
    o = o.reshape(B, Tp, Hv, Vp)[:, :T, :, :V]
    return o, final[:, :, :K, :V]
