"""Short causal depthwise convolution as Pallas Triton kernels (GPU): forward, backward and
the one-token step for decoding.

Computes, as ``reference.causal_conv1d_naive`` (shapes and dtypes there)::

    y[t] = act(bias + sum_j weight[j] * xp[t + j]),   xp = [initial_state; x]  (W - 1 rows)

One program per (batch row, block of ``block_c`` channels, segment of ``seg`` steps). It
walks its segment row by row (``unroll`` rows per loop iteration, their loads issued
together) and keeps the last W - 1 input rows in registers, so every input row is read
once plus a W - 1 row halo per segment; accumulation is float32.

The backward walks the same way: ``dpre[t] = dy[t] * act'(pre[t])`` with ``pre[t]``
recomputed from the register window, ``dx[s] = sum_j weight[j] dpre[s + W - 1 - j]``
emitted W - 1 steps later from a window of dpre rows (the first segment also emits
d initial_state), and per-segment partial sums of dweight and dbias that XLA reduces.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from seqmix.kernels.dispatch import interpret_mode

MAX_WIDTH = 8


@dataclasses.dataclass(frozen=True)
class Blocks:
    """``block_c`` (power of 2) channels per program, ``seg`` steps per program (a multiple
    of ``unroll``), ``unroll`` rows per loop iteration."""

    block_c: int = 256
    seg: int = 256
    unroll: int = 8
    num_warps: int = 4


GPU_BLOCKS = Blocks()
INTERPRET_BLOCKS = Blocks(block_c=16, seg=4, unroll=2, num_warps=1)


@dataclasses.dataclass(frozen=True)
class _Static:
    T: int
    W: int
    silu: bool
    block_c: int
    seg: int
    unroll: int
    num_warps: int
    interpret: bool


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


def _cols(st, C):
    """This program's channels: as a slice, as indices, and which are < C."""
    c0 = pl.program_id(1) * st.block_c
    c = c0 + jnp.arange(st.block_c)
    return pl.ds(c0, st.block_c), c, c < C


def _loader(x_ref, h_ref, b, cs, cmask, st):
    """Row r of xp as float32 ``[block_c]``: x[r] for 0 <= r < T, the initial state for
    r < 0 (zeros without one), zeros for r >= T."""

    def load(r, history=True):
        """``history=False`` when r >= 0 is known (the rows a segment walks)."""
        ok = cmask & (r < st.T) & ((r >= 0) if history else True)
        v = plgpu.load(x_ref.at[b, r, cs], mask=ok, other=0.0).astype(jnp.float32)
        if h_ref is not None and history:
            hv = plgpu.load(h_ref.at[b, r + st.W - 1, cs], mask=cmask & (r < 0), other=0.0)
            v = v + hv.astype(jnp.float32)
        return v

    return load


def _fwd_kernel(x_ref, w_ref, bias_ref, h_ref, y_ref, *, st: _Static):
    b, W = pl.program_id(0), st.W
    s0 = pl.program_id(2) * st.seg
    cs, cols, cmask = _cols(st, x_ref.shape[2])
    load = _loader(x_ref, h_ref, b, cs, cmask, st)
    w = [plgpu.load(w_ref.at[j, cols], mask=cmask, other=0.0).astype(jnp.float32) for j in range(W)]
    bias = (
        plgpu.load(bias_ref.at[cols], mask=cmask, other=0.0).astype(jnp.float32)
        if bias_ref is not None
        else None
    )

    def body(i, window):
        for k in range(st.unroll):
            t = s0 + i * st.unroll + k
            taps = window + (load(t, history=False),)
            pre = w[0] * taps[0]
            for j in range(1, W):
                pre = pre + w[j] * taps[j]
            if bias is not None:
                pre = pre + bias
            y = pre * jax.nn.sigmoid(pre) if st.silu else pre
            plgpu.store(y_ref.at[b, t, cs], y.astype(y_ref.dtype), mask=cmask & (t < st.T))
            window = taps[1:]
        return window

    window = tuple(load(s0 - W + 1 + k) for k in range(W - 1))
    lax.fori_loop(0, st.seg // st.unroll, body, window)


def _bwd_kernel(
    x_ref, w_ref, bias_ref, h_ref, dy_ref, dx_ref, dw_ref, db_ref, dh_ref, *, st: _Static
):
    b, W = pl.program_id(0), st.W
    seg_ix = pl.program_id(2)
    s0 = seg_ix * st.seg
    cs, cols, cmask = _cols(st, x_ref.shape[2])
    load = _loader(x_ref, h_ref, b, cs, cmask, st)
    w = [plgpu.load(w_ref.at[j, cols], mask=cmask, other=0.0).astype(jnp.float32) for j in range(W)]
    bias = (
        plgpu.load(bias_ref.at[cols], mask=cmask, other=0.0).astype(jnp.float32)
        if bias_ref is not None
        else None
    )
    zero = jnp.zeros((st.block_c,), jnp.float32)

    def step(t, carry, owned):
        """Computes dpre[t], accumulates dweight/dbias (when t is this segment's) and
        emits dx[t - W + 1] (or d initial_state for the first segment's first rows)."""
        xwin, dwin, dw, db = carry
        taps = xwin + (load(t, history=False),)
        dy = plgpu.load(dy_ref.at[b, t, cs], mask=cmask & (t < st.T), other=0.0)
        dpre = dy.astype(jnp.float32)
        if st.silu:
            pre = w[0] * taps[0]
            for j in range(1, W):
                pre = pre + w[j] * taps[j]
            if bias is not None:
                pre = pre + bias
            sg = jax.nn.sigmoid(pre)
            dpre = dpre * sg * (1.0 + pre * (1.0 - sg))
        if owned:
            dw = tuple(dw[j] + dpre * taps[j] for j in range(W))
            db = db + dpre
        dwin = dwin + (dpre,)  # dpre[t - W + 1 .. t]
        s = t - (W - 1)
        dx = w[W - 1] * dwin[0]
        for j in range(W - 1):
            dx = dx + w[j] * dwin[W - 1 - j]
        plgpu.store(
            dx_ref.at[b, s, cs], dx.astype(dx_ref.dtype), mask=cmask & (s >= s0) & (s < st.T)
        )
        if dh_ref is not None:
            plgpu.store(
                dh_ref.at[b, s + W - 1, cs],
                dx.astype(dh_ref.dtype),
                mask=cmask & (s < 0) & (seg_ix == 0),
            )
        return taps[1:], dwin[1:], dw, db

    def body(i, carry):
        for k in range(st.unroll):
            carry = step(s0 + i * st.unroll + k, carry, owned=True)
        return carry

    xwin = tuple(load(s0 - W + 1 + k) for k in range(W - 1))
    carry = (xwin, (zero,) * (W - 1), (zero,) * W, zero)
    carry = lax.fori_loop(0, st.seg // st.unroll, body, carry)
    for k in range(W - 1):  # the halo: dpre of the next segment's first rows
        carry = step(s0 + st.seg + k, carry, owned=False)
    _, _, dw, db = carry
    for j in range(W):
        plgpu.store(dw_ref.at[b, seg_ix, j, cols], dw[j], mask=cmask)
    if db_ref is not None:
        plgpu.store(db_ref.at[b, seg_ix, cols], db, mask=cmask)


def _grid(st, B, C):
    return (B, pl.cdiv(C, st.block_c), pl.cdiv(st.T, st.seg))


def _params(st):
    return dict(
        interpret=st.interpret,
        compiler_params=plgpu.CompilerParams(num_warps=st.num_warps, num_stages=1),
    )


def _forward(st, x, weight, bias, h0):
    B, _T, C = x.shape
    args = [x, weight] + [a for a in (bias, h0) if a is not None]

    def kernel(*refs):
        it = iter(refs)
        x_ref, w_ref = next(it), next(it)
        b_ref = next(it) if bias is not None else None
        h_ref = next(it) if h0 is not None else None
        _fwd_kernel(x_ref, w_ref, b_ref, h_ref, next(it), st=st)

    return pl.pallas_call(
        kernel,
        grid=_grid(st, B, C),
        out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
        name="causal_conv1d_fwd",
        **_params(st),
    )(*args)


def _backward(st, x, weight, bias, h0, dy):
    B, T, C = x.shape
    W = st.W
    n_seg = pl.cdiv(T, st.seg)
    f32 = jnp.float32
    args = [x, weight] + [a for a in (bias, h0) if a is not None] + [dy]
    out_shape = [
        jax.ShapeDtypeStruct(x.shape, x.dtype),
        jax.ShapeDtypeStruct((B, n_seg, W, C), f32),
    ]
    if bias is not None:
        out_shape.append(jax.ShapeDtypeStruct((B, n_seg, C), f32))
    if h0 is not None:
        out_shape.append(jax.ShapeDtypeStruct(h0.shape, f32))

    def kernel(*refs):
        it = iter(refs)
        x_ref, w_ref = next(it), next(it)
        b_ref = next(it) if bias is not None else None
        h_ref = next(it) if h0 is not None else None
        dy_ref, dx_ref, dw_ref = next(it), next(it), next(it)
        db_ref = next(it) if bias is not None else None
        dh_ref = next(it) if h0 is not None else None
        _bwd_kernel(x_ref, w_ref, b_ref, h_ref, dy_ref, dx_ref, dw_ref, db_ref, dh_ref, st=st)

    outs = iter(
        pl.pallas_call(
            kernel,
            grid=_grid(st, B, C),
            out_shape=out_shape,
            name="causal_conv1d_bwd",
            **_params(st),
        )(*args)
    )
    dx, dw = next(outs), next(outs)
    db = next(outs).sum((0, 1)).astype(bias.dtype) if bias is not None else None
    dh = next(outs).astype(h0.dtype) if h0 is not None else None
    return dx, dw.sum((0, 1)).astype(weight.dtype), db, dh


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _conv(st, x, weight, bias, h0):
    return _forward(st, x, weight, bias, h0)


def _conv_fwd(st, x, weight, bias, h0):
    return _forward(st, x, weight, bias, h0), (x, weight, bias, h0)


def _conv_bwd(st, res, dy):
    return _backward(st, *res, dy)


_conv.defvjp(_conv_fwd, _conv_bwd)


def _blocks(blocks):
    blocks = blocks or (INTERPRET_BLOCKS if interpret_mode() else GPU_BLOCKS)
    if blocks.seg % blocks.unroll:
        raise ValueError(f"blocks.unroll ({blocks.unroll}) must divide blocks.seg ({blocks.seg})")
    return blocks


def causal_conv1d(
    x, weight, bias=None, *, activation=None, initial_state=None, blocks: Blocks | None = None
):
    """The ``pallas_triton`` implementation (arguments as ``reference.causal_conv1d_naive``).

    Returns ``(y [B, T, C] in x's dtype, final_state [B, W - 1, C] in x's dtype)``;
    differentiable in x, weight, bias and initial_state. ``blocks`` overrides tile sizes.
    """
    _no_float64(x, weight, bias, initial_state)
    W = weight.shape[0]
    _check_width(W)
    blocks = _blocks(blocks)
    _B, T, _C = x.shape
    st = _Static(
        T=T,
        W=W,
        silu=activation == "silu",
        block_c=blocks.block_c,
        seg=max(min(blocks.seg, pl.next_power_of_2(T)), blocks.unroll),
        unroll=blocks.unroll,
        num_warps=blocks.num_warps,
        interpret=interpret_mode(),
    )
    st = dataclasses.replace(st, seg=-(-st.seg // st.unroll) * st.unroll)
    y = _conv(st, x, weight, bias, initial_state)
    return y, final_state(x, initial_state, W)


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


def _step_kernel(x_ref, s_ref, w_ref, bias_ref, y_ref, ns_ref, *, W, silu, block_c):
    b = pl.program_id(0)
    cols = pl.program_id(1) * block_c + jnp.arange(block_c)
    cmask = cols < x_ref.shape[1]
    rows = [plgpu.load(s_ref.at[b, k, cols], mask=cmask, other=0.0) for k in range(W - 1)]
    xt = plgpu.load(x_ref.at[b, cols], mask=cmask, other=0.0)
    taps = rows + [xt]
    pre = jnp.zeros((block_c,), jnp.float32)
    for j in range(W):
        w = plgpu.load(w_ref.at[j, cols], mask=cmask, other=0.0).astype(jnp.float32)
        pre = pre + w * taps[j].astype(jnp.float32)
    if bias_ref is not None:
        pre = pre + plgpu.load(bias_ref.at[cols], mask=cmask, other=0.0).astype(jnp.float32)
    y = pre * jax.nn.sigmoid(pre) if silu else pre
    plgpu.store(y_ref.at[b, cols], y.astype(y_ref.dtype), mask=cmask)
    for k in range(W - 1):
        plgpu.store(ns_ref.at[b, k, cols], taps[k + 1].astype(ns_ref.dtype), mask=cmask)


def causal_conv1d_step(
    x, state, weight, bias=None, *, activation=None, blocks: Blocks | None = None
):
    """One decoding token (``pallas_triton``): x ``[B, C]``, state ``[B, W - 1, C]`` ->
    ``(y [B, C] in x's dtype, new_state = [state[:, 1:], x] in x's dtype)``.

    Inference only: this kernel has no VJP (differentiate ``causal_conv1d`` instead).
    """
    _no_float64(x, state, weight, bias)
    W = weight.shape[0]
    _check_width(W)
    blocks = _blocks(blocks)
    B, C = x.shape
    bc = blocks.block_c
    args = [x, state, weight] + ([bias] if bias is not None else [])

    def kernel(*refs):
        if bias is None:
            refs = refs[:3] + (None,) + refs[3:]
        _step_kernel(*refs, W=W, silu=activation == "silu", block_c=bc)

    return tuple(
        pl.pallas_call(
            kernel,
            grid=(B, pl.cdiv(C, bc)),
            out_shape=[
                jax.ShapeDtypeStruct(x.shape, x.dtype),
                jax.ShapeDtypeStruct(state.shape, x.dtype),
            ],
            interpret=interpret_mode(),
            compiler_params=plgpu.CompilerParams(num_warps=blocks.num_warps, num_stages=1),
            name="causal_conv1d_step",
        )(*args)
    )
