"""Short causal depthwise convolution as Pallas Mosaic TPU kernels: forward, backward and
the one-token step for decoding.

Computes, as ``reference.causal_conv1d_naive`` (shapes and dtypes there)::

    y[t] = act(bias + sum_j weight[j] * xp[t + j]),   xp = [initial_state; x]  (W - 1 rows)

Tiles are ``[block_t, block_c]`` (time on sublanes, channels on lanes). The W - 1 row
history of a tile comes from a second, ``halo``-row block of the same input just before it
(the initial state, zero-padded to ``halo`` rows, for the first tile), so tiles are
independent. Inside, the tile and its halo are converted once to a float32 VMEM scratch and
the W taps are static sublane-offset reads of it.

Backward: ``dpre = dy * act'(pre)`` over the tile plus ``halo`` rows after it (their inputs
from the next tile's first rows), then ``dx[s] = sum_j weight[j] dpre[s + W - 1 - j]``,
per-tile partial sums of dweight and dbias (reduced in XLA), and d initial_state from the
first tile.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from seqmix.kernels.dispatch import interpret_mode

LANES = 128
HALO = 16  # rows of the halo block: >= W - 1 and a whole bf16 sublane tile
MAX_WIDTH = HALO // 2


@dataclasses.dataclass(frozen=True)
class Blocks:
    """``block_t`` (a multiple of 16) steps and ``block_c`` (a multiple of 128) channels."""

    block_t: int = 256
    block_c: int = 512


TPU_BLOCKS = Blocks()
INTERPRET_BLOCKS = Blocks(block_t=16, block_c=128)


@dataclasses.dataclass(frozen=True)
class _Static:
    W: int
    silu: bool
    block_t: int
    block_c: int
    interpret: bool


def final_state(x, initial_state, W):
    """The last W - 1 rows of ``[initial_state; x]`` in x's dtype (plain XLA slicing)."""
    B, T, C = x.shape
    if T >= W - 1:
        return x[:, T - (W - 1) :]
    prev = (
        jnp.zeros((B, W - 1, C), x.dtype)
        if initial_state is None
        else initial_state.astype(x.dtype)
    )
    return jnp.concatenate([prev[:, T:], x], axis=1)


def _no_float64(*arrays) -> None:
    if any(a is not None and a.dtype == jnp.float64 for a in arrays):
        raise NotImplementedError(
            "the Pallas kernels compute in float32; float64 inputs need "
            "the naive or xla implementation"
        )


def _check_width(W: int) -> None:
    if not 2 <= W <= MAX_WIDTH:
        raise NotImplementedError(
            f"causal_conv1d pallas kernels support widths 2 to {MAX_WIDTH}, got weight of width {W}"
        )


def _silu_grad(pre):
    s = jax.nn.sigmoid(pre)
    return s * (1.0 + pre * (1.0 - s))


def _pre(xe_ref, w_ref, bias_ref, W, start, rows):
    """bias + sum_j w[j] * xe[start + j : start + j + rows] (float32 ``[rows, block_c]``)."""
    acc = None
    for j in range(W):
        term = w_ref[pl.ds(j, 1), :].astype(jnp.float32) * xe_ref[pl.ds(start + j, rows), :]
        acc = term if acc is None else acc + term
    if bias_ref is not None:
        acc = acc + bias_ref[...].astype(jnp.float32)
    return acc


def _fill_history(xe_ref, halo_ref, h_ref, i):
    """Rows [0, HALO) of the scratch: the HALO inputs before this tile."""

    @pl.when(i == 0)
    def _():
        if h_ref is not None:
            xe_ref[pl.ds(0, HALO), :] = h_ref[...].astype(jnp.float32)
        else:
            xe_ref[pl.ds(0, HALO), :] = jnp.zeros((HALO, xe_ref.shape[1]), jnp.float32)

    @pl.when(i > 0)
    def _():
        xe_ref[pl.ds(0, HALO), :] = halo_ref[...].astype(jnp.float32)


def _fwd_kernel(x_ref, halo_ref, w_ref, bias_ref, h_ref, y_ref, xe_ref, *, st: _Static):
    Tc = st.block_t
    _fill_history(xe_ref, halo_ref, h_ref, pl.program_id(2))
    xe_ref[pl.ds(HALO, Tc), :] = x_ref[...].astype(jnp.float32)
    pre = _pre(xe_ref, w_ref, bias_ref, st.W, HALO - (st.W - 1), Tc)
    y = pre * jax.nn.sigmoid(pre) if st.silu else pre
    y_ref[...] = y.astype(y_ref.dtype)


def _bwd_kernel(
    x_ref,
    halo_ref,
    after_ref,
    w_ref,
    bias_ref,
    h_ref,
    dy_ref,
    dy_after_ref,
    dx_ref,
    dw_ref,
    db_ref,
    dh_ref,
    xe_ref,
    de_ref,
    *,
    st: _Static,
):
    Tc, W = st.block_t, st.W
    i = pl.program_id(2)
    last = i == pl.num_programs(2) - 1
    _fill_history(xe_ref, halo_ref, h_ref, i)
    xe_ref[pl.ds(HALO, Tc), :] = x_ref[...].astype(jnp.float32)
    after = after_ref[...].astype(jnp.float32)
    xe_ref[pl.ds(HALO + Tc, HALO), :] = jnp.where(last, 0.0, after)
    # dpre over the tile and the HALO rows after it (zero past the end).
    dy_after = jnp.where(last, 0.0, dy_after_ref[...].astype(jnp.float32))
    de_ref[pl.ds(0, Tc), :] = dy_ref[...].astype(jnp.float32)
    de_ref[pl.ds(Tc, HALO), :] = dy_after
    if st.silu:
        pre = _pre(xe_ref, w_ref, bias_ref, W, HALO - (W - 1), Tc + HALO)
        de_ref[...] = de_ref[...] * _silu_grad(pre)
    dx = None
    for j in range(W):
        term = w_ref[pl.ds(j, 1), :].astype(jnp.float32) * de_ref[pl.ds(W - 1 - j, Tc), :]
        dx = term if dx is None else dx + term
    dx_ref[...] = dx.astype(dx_ref.dtype)
    de = de_ref[pl.ds(0, Tc), :]
    for j in range(W):
        xs = xe_ref[pl.ds(HALO - (W - 1) + j, Tc), :]
        dw_ref[pl.ds(j, 1), :] = jnp.sum(de * xs, axis=0, keepdims=True)
    if db_ref is not None:
        db_ref[...] = jnp.sum(de, axis=0, keepdims=True)
    if dh_ref is not None:

        @pl.when(i == 0)
        def _():
            for k in range(W - 1):  # d xp[k] = sum_{j <= k} w[j] dpre[k - j]
                acc = None
                for j in range(k + 1):
                    term = w_ref[pl.ds(j, 1), :].astype(jnp.float32) * de_ref[pl.ds(k - j, 1), :]
                    acc = term if acc is None else acc + term
                dh_ref[pl.ds(k, 1), :] = acc.astype(dh_ref.dtype)


def _specs(st: _Static, nT: int):
    Tc, bc = st.block_t, st.block_c
    r = Tc // HALO
    tile = pl.BlockSpec((None, Tc, bc), lambda b, c, i: (b, i, c))
    before = pl.BlockSpec((None, HALO, bc), lambda b, c, i: (b, jnp.maximum(i * r - 1, 0), c))
    after = pl.BlockSpec(
        (None, HALO, bc), lambda b, c, i: (b, jnp.minimum((i + 1) * r, nT * r - 1), c)
    )
    w = pl.BlockSpec((st.W, bc), lambda b, c, i: (0, c))
    row = pl.BlockSpec((1, bc), lambda b, c, i: (0, c))
    hist = pl.BlockSpec((None, HALO, bc), lambda b, c, i: (b, 0, c))
    part = pl.BlockSpec((None, None, st.W, bc), lambda b, c, i: (b, i, 0, c))
    part_row = pl.BlockSpec((None, None, 1, bc), lambda b, c, i: (b, i, 0, c))
    dh = pl.BlockSpec((None, st.W - 1, bc), lambda b, c, i: (b, 0, c))
    return dict(
        tile=tile,
        before=before,
        after=after,
        w=w,
        row=row,
        hist=hist,
        part=part,
        part_row=part_row,
        dh=dh,
    )


def _interpret(st):
    return pltpu.InterpretParams(detect_races=True) if st.interpret else False


def _forward(st, x, weight, bias, hist):
    B, Tp, Cp = x.shape
    nT = Tp // st.block_t
    sp = _specs(st, nT)
    args = [
        (x, sp["tile"]),
        (x, sp["before"]),
        (weight, sp["w"]),
        (bias, sp["row"]),
        (hist, sp["hist"]),
    ]
    present = [a is not None for a, _ in args]

    def kernel(*refs):
        it = iter(refs)
        ins = [next(it) if p else None for p in present]
        _fwd_kernel(*ins, *it, st=st)

    return pl.pallas_call(
        kernel,
        grid=(B, Cp // st.block_c, nT),
        in_specs=[s for a, s in args if a is not None],
        out_specs=sp["tile"],
        out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
        scratch_shapes=[pltpu.VMEM((HALO + st.block_t, st.block_c), jnp.float32)],
        interpret=_interpret(st),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel")
        ),
        name="causal_conv1d_fwd",
    )(*[a for a, _ in args if a is not None])


def _backward(st, x, weight, bias, hist, dy):
    B, Tp, Cp = x.shape
    W = st.W
    nT = Tp // st.block_t
    sp = _specs(st, nT)
    f32 = jnp.float32
    args = [
        (x, sp["tile"]),
        (x, sp["before"]),
        (x, sp["after"]),
        (weight, sp["w"]),
        (bias, sp["row"]),
        (hist, sp["hist"]),
        (dy, sp["tile"]),
        (dy, sp["after"]),
    ]
    outs = [
        (jax.ShapeDtypeStruct(x.shape, x.dtype), sp["tile"]),
        (jax.ShapeDtypeStruct((B, nT, W, Cp), f32), sp["part"]),
        (jax.ShapeDtypeStruct((B, nT, 1, Cp), f32) if bias is not None else None, sp["part_row"]),
        (jax.ShapeDtypeStruct((B, W - 1, Cp), f32) if hist is not None else None, sp["dh"]),
    ]
    present = [a is not None for a, _ in args] + [o is not None for o, _ in outs]

    def kernel(*refs):
        it = iter(refs)
        refs = [next(it) if p else None for p in present]
        _bwd_kernel(*refs, *it, st=st)

    got = iter(
        pl.pallas_call(
            kernel,
            grid=(B, Cp // st.block_c, nT),
            in_specs=[s for a, s in args if a is not None],
            out_specs=[s for o, s in outs if o is not None],
            out_shape=[o for o, _ in outs if o is not None],
            scratch_shapes=[
                pltpu.VMEM((2 * HALO + st.block_t, st.block_c), f32),
                pltpu.VMEM((HALO + st.block_t, st.block_c), f32),
            ],
            interpret=_interpret(st),
            # d initial_state is written by the first time tile and kept resident: time is
            # sequential.
            compiler_params=pltpu.CompilerParams(
                dimension_semantics=("parallel", "parallel", "arbitrary")
            ),
            name="causal_conv1d_bwd",
        )(*[a for a, _ in args if a is not None])
    )
    dx, dw = next(got), next(got)
    db = next(got).sum((0, 1)).astype(bias.dtype) if bias is not None else None
    dh = None
    if hist is not None:  # back to the zero-padded HALO-row history layout
        dh = next(got)
        dh = jnp.pad(dh, [(0, 0), (HALO - (W - 1), 0), (0, 0)]).astype(hist.dtype)
    return dx, dw.sum((0, 1)).astype(weight.dtype), db, dh


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _conv(st, x, weight, bias, hist):
    return _forward(st, x, weight, bias, hist)


def _conv_fwd(st, x, weight, bias, hist):
    return _forward(st, x, weight, bias, hist), (x, weight, bias, hist)


def _conv_bwd(st, res, dy):
    return _backward(st, *res, dy)


_conv.defvjp(_conv_fwd, _conv_bwd)


def causal_conv1d(
    x, weight, bias=None, *, activation=None, initial_state=None, blocks: Blocks | None = None
):
    """The ``pallas_tpu`` implementation (arguments as ``reference.causal_conv1d_naive``).

    Returns ``(y [B, T, C] in x's dtype, final_state [B, W - 1, C] in x's dtype)``;
    differentiable in x, weight, bias and initial_state. ``blocks`` overrides tile sizes.
    """
    _no_float64(x, weight, bias, initial_state)
    W = weight.shape[0]
    _check_width(W)
    blocks = blocks or (INTERPRET_BLOCKS if interpret_mode() else TPU_BLOCKS)
    if blocks.block_t % HALO or blocks.block_c % LANES:
        raise ValueError(
            f"blocks.block_t must be a multiple of {HALO} and blocks.block_c of "
            f"{LANES}, got {blocks}"
        )
    _B, T, C = x.shape
    Tc = min(blocks.block_t, -(-T // HALO) * HALO)
    Cp = -(-C // LANES) * LANES
    bc = max(d for d in range(LANES, min(blocks.block_c, Cp) + 1, LANES) if Cp % d == 0)
    Tp = -(-T // Tc) * Tc
    st = _Static(W=W, silu=activation == "silu", block_t=Tc, block_c=bc, interpret=interpret_mode())
    xp = jnp.pad(x, [(0, 0), (0, Tp - T), (0, Cp - C)])
    hist = None
    if initial_state is not None:
        hist = jnp.pad(initial_state, [(0, 0), (HALO - (W - 1), 0), (0, Cp - C)])
    wp = jnp.pad(weight, [(0, 0), (0, Cp - C)])
    bp = None if bias is None else jnp.pad(bias, [(0, Cp - C)])[None]
    y = _conv(st, xp, wp, bp, hist)[:, :T, :C]
    return y, final_state(x, initial_state, W)


def _step_kernel(x_ref, s_ref, w_ref, bias_ref, y_ref, ns_ref, *, W, silu):
    xt = x_ref[...]
    rows = [s_ref[pl.ds(k, 1), :] for k in range(W - 1)] + [xt]
    pre = None
    for j in range(W):
        term = w_ref[pl.ds(j, 1), :].astype(jnp.float32) * rows[j].astype(jnp.float32)
        pre = term if pre is None else pre + term
    if bias_ref is not None:
        pre = pre + bias_ref[...].astype(jnp.float32)
    y = pre * jax.nn.sigmoid(pre) if silu else pre
    y_ref[...] = y.astype(y_ref.dtype)
    for k in range(W - 1):
        ns_ref[pl.ds(k, 1), :] = rows[k + 1].astype(ns_ref.dtype)


def causal_conv1d_step(
    x, state, weight, bias=None, *, activation=None, blocks: Blocks | None = None
):
    """One decoding token (``pallas_tpu``): x ``[B, C]``, state ``[B, W - 1, C]`` ->
    ``(y [B, C] in x's dtype, new_state = [state[:, 1:], x] in x's dtype)``.

    Inference only: this kernel has no VJP (differentiate ``causal_conv1d`` instead).
    """
    _no_float64(x, state, weight, bias)
    W = weight.shape[0]
    _check_width(W)
    blocks = blocks or (INTERPRET_BLOCKS if interpret_mode() else TPU_BLOCKS)
    B, C = x.shape
    Cp = -(-C // LANES) * LANES
    bc = max(d for d in range(LANES, min(blocks.block_c, Cp) + 1, LANES) if Cp % d == 0)
    pad = [(0, 0), (0, Cp - C)]
    args = [
        jnp.pad(x, pad)[:, None],
        jnp.pad(state, [(0, 0), (0, 0), (0, Cp - C)]),
        jnp.pad(weight, pad),
    ]
    row = pl.BlockSpec((None, 1, bc), lambda b, c: (b, 0, c))
    st_spec = pl.BlockSpec((None, W - 1, bc), lambda b, c: (b, 0, c))
    specs = [row, st_spec, pl.BlockSpec((W, bc), lambda b, c: (0, c))]
    if bias is not None:
        args.append(jnp.pad(bias, [(0, Cp - C)])[None])
        specs.append(pl.BlockSpec((1, bc), lambda b, c: (0, c)))

    def kernel(*refs):
        if bias is None:
            refs = refs[:3] + (None,) + refs[3:]
        _step_kernel(*refs, W=W, silu=activation == "silu")

    y, ns = pl.pallas_call(
        kernel,
        grid=(B, Cp // bc),
        in_specs=specs,
        out_specs=[row, st_spec],
        out_shape=[
            jax.ShapeDtypeStruct((B, 1, Cp), x.dtype),
            jax.ShapeDtypeStruct((B, W - 1, Cp), x.dtype),
        ],
        interpret=pltpu.InterpretParams(detect_races=True) if interpret_mode() else False,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
        name="causal_conv1d_step",
    )(*args)
    return y[:, 0, :C], ns[..., :C]
