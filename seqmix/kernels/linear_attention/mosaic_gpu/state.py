"""Sequential passes over chunks: the chunk states (forward) and their gradients (reverse).

Forward, for chunk ``c`` with ``b`` the inclusive cumulative log decay inside it:

    S_{c+1} = a_c S_c + sum_s w_s k_s v_s^T,   w_s = exp(b_last - b_s) [run_s = run_last],
    a_c = exp(b_last) [run_last = run_prev]

Reverse (``dS_{c+1}``: gradient of the state leaving chunk ``c``):

    dS_c = a_c dS_{c+1} + scale sum_t u_t q_t do_t^T,   u_t = exp(b_t) [run_t = run_prev]

with ``dS_n = d final_state``. Per-channel decays make ``w``, ``u`` ``[C, K]`` and ``a`` a
``[K]`` row scale. One program per (value block, segment, batch * v head) keeps the
``[K, block_v]`` float32 state in registers and walks its chunks through a TMA pipeline;
each step is one wgmma ``x^T (weights * y)`` with the weighted operand staged in SMEM
(scalar decay weights the value rows, per-channel decay the key columns). The carried
value entering each step is what gets stored (bf16/fp16): the state entering the chunk,
or the gradient of the state leaving it.

Two-level pass (``plan.segments = P > 1``): the chunks split into ``P`` segments walked in
parallel. A first pass from zero stores nothing but every segment's end value; the ``P``
segment decays combine them in XLA (``combine``) into the true value entering each
segment; a second pass starts every segment there and stores the chunk values, which are
then exact and need no completion downstream.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from seqmix.kernels.linear_attention.mosaic_gpu import common as cm
from seqmix.kernels.linear_attention.mosaic_gpu.plan import Plan

F32 = jnp.float32


def _state_kernel(*refs, plan: Plan, reverse: bool, store: bool, has_init: bool, **scratch):
    it = iter(refs)
    x_ref, y_ref = next(it), next(it)
    b_ref = next(it) if plan.decay != "none" else None
    bl_ref = next(it) if plan.decay == "channel" else None
    m_ref = next(it) if plan.has_runs else None
    init_ref = next(it) if has_init else None
    states_ref = next(it) if store else None
    ends_ref = next(it)
    s = scratch
    C, K, BV = plan.chunk, plan.key_dim, plan.block_v
    dtype = jnp.dtype(plan.dtype)
    vb, seg, bh = lax.axis_index("vb"), lax.axis_index("seg"), lax.axis_index("bh")
    bi, h, hq = plan.heads(bh)
    vcols = pl.ds(vb * BV, BV)
    Ls = plan.segment_chunks

    def chunk(i):
        return seg * Ls + (Ls - 1 - i if reverse else i)

    def fetch(i, slot, barrier):
        c = chunk(i)
        t = pl.ds(c * C, C)
        plgpu.copy_gmem_to_smem(x_ref.at[bi, t, hq], s["x"].at[slot], barrier)
        plgpu.copy_gmem_to_smem(y_ref.at[bi, t, h, vcols], s["y"].at[slot], barrier)
        if plan.decay == "scalar":
            plgpu.copy_gmem_to_smem(b_ref.at[bi, h, t], s["b"].at[slot], barrier)
        elif plan.decay == "channel":
            plgpu.copy_gmem_to_smem(b_ref.at[bi, t, h], s["b"].at[slot], barrier)
            plgpu.copy_gmem_to_smem(bl_ref.at[bi, c, h], s["bl"].at[slot], barrier)
            if reverse:
                plgpu.copy_gmem_to_smem(b_ref.at[bi, c * C, h], s["bf"].at[slot], barrier)
        if m_ref is not None:
            plgpu.copy_gmem_to_smem(m_ref.at[bi, pl.ds(0, 2), t], s["m"].at[slot], barrier)

    def body(i, slot, S):
        c = chunk(i)
        if store:
            ob = lax.rem(i, 2)
            cm.before_staging(2)
            s["out"][ob] = S.astype(s["out"].dtype)
            cm.write_out([(s["out"].at[ob], states_ref.at[bi, h, c, :, vcols])])
        x_s, y_s = s["x"].at[slot], s["y"].at[slot]
        carry = None if m_ref is None else s["m"][slot, 0, C - 1]  # [run_last = run_prev]
        keep = None
        if m_ref is not None:  # tokens reaching (reverse: reached by) the carried value
            keep = plgpu.load(s["m"].at[slot, 0 if reverse else 1], layout=cm.ROW)
        # Reverse weights exp(b_t) are taken relative to the chunk's first token (their
        # largest value: runs kept by the carried value are a prefix of the chunk) and the
        # factor exp(b_0) multiplies the float32 update, so that fp16 operands keep the
        # significant weights in range under strong decay.
        post = plan.scale if reverse else None
        if plan.decay == "channel":
            b = s["b"][slot]  # [C, K]
            ref = cm.cols(plgpu.load(s["bf" if reverse else "bl"].at[slot], layout=cm.COL), (C, K))
            e = jnp.exp(b - ref) if reverse else jnp.exp(ref - b)  # both <= 1
            if keep is not None:
                e = e * cm.rows(keep, (C, K))
            s["w"][...] = (x_s[...].astype(F32) * e).astype(dtype)
            plgpu.commit_smem()
            update = cm.matmul((K, BV), (s["w"].T, y_s))
            a = cm.rows(jnp.exp(plgpu.load(s["bl"].at[slot], layout=cm.ROW)), (K, BV))
            if reverse:
                first = jnp.exp(plgpu.load(s["bf"].at[slot], layout=cm.ROW))
                post = cm.rows(first * plan.scale, (K, BV))
        else:
            wvec, a = None, None
            if plan.decay == "scalar":
                b = plgpu.load(s["b"].at[slot], layout=cm.ROW)
                bl = s["b"][slot, C - 1]
                if reverse:
                    b0 = s["b"][slot, 0]
                    wvec = jnp.exp(b - b0)
                    post = plan.scale * jnp.exp(b0)
                else:
                    wvec = jnp.exp(bl - b)
                a = jnp.exp(bl)
            if keep is not None:
                wvec = keep if wvec is None else wvec * keep
            if wvec is None:
                update = cm.matmul((K, BV), (x_s.T, y_s))
            else:
                s["w"][...] = (y_s[...].astype(F32) * cm.rows(wvec, (C, BV))).astype(dtype)
                plgpu.commit_smem()
                update = cm.matmul((K, BV), (x_s.T, s["w"]))
        if post is not None:
            update = post * update
        if carry is not None:
            a = carry if a is None else a * carry
        return update + (S if a is None else a * S)

    if init_ref is not None:
        # read and written once per program: straight between GMEM and registers
        S0 = plgpu.load(init_ref.at[bi, h, seg, :, vcols], layout=cm.WGMMA, optimized=False)
    else:
        S0 = plgpu.layout_cast(jnp.zeros((K, BV), F32), cm.WGMMA)
    S = cm.pipeline(
        steps=Ls, depth=plan.depth, barriers=s["bars"], fetch=fetch, body=body, carry=S0
    )
    ends_ref.at[bi, h, seg, :, vcols][...] = S
    cm.finish_writes()


def _copies_per_step(plan: Plan, reverse: bool) -> int:
    decay = {"none": 0, "scalar": 1, "channel": 3 if reverse else 2}[plan.decay]
    return 2 + decay + int(plan.has_runs)


def state_pass(plan: Plan, x, y, b, b_last, masks, init, *, reverse: bool, store: bool):
    """One sequential pass; returns ``(states or None, ends)``.

    x ``[B, T, Hqk, K]`` (k forward, q reverse), y ``[B, T, Hv, V]`` (v / do), b scalar
    ``[B, Hv, T]`` or per channel ``[B, T, Hv, K]`` (with ``b_last [B, n, Hv, K]``, its
    value at every chunk's last token), masks ``[B, 3, T]`` float (keep_prev, keep_last,
    runs),
    init ``[B, Hv, P, K, V]`` float32 or None. ``states [B, Hv, n, K, V]`` in the input
    dtype: the value carried into every chunk (forward) or out of it (reverse); ``ends
    [B, Hv, P, K, V]`` float32: every segment's last carried value."""
    B, H, K, V, n, P = (
        plan.batch,
        plan.v_heads,
        plan.key_dim,
        plan.value_dim,
        plan.chunks,
        plan.segments,
    )
    C, BV, D = plan.chunk, plan.block_v, plan.depth
    dtype = jnp.dtype(plan.dtype)
    args = [x, y]
    scratch = {
        "x": cm.tile((D, C, K), dtype),
        "y": cm.tile((D, C, BV), dtype),
        "bars": plgpu.Barrier(num_arrivals=_copies_per_step(plan, reverse), num_barriers=D),
    }
    if plan.decay == "scalar":
        args.append(b)
        scratch["b"] = cm.vector((D, C))
    elif plan.decay == "channel":
        args += [b, b_last]
        scratch["b"] = cm.tile((D, C, K), F32)
        scratch["bl"] = cm.vector((D, K))
        if reverse:
            scratch["bf"] = cm.vector((D, K))
    if plan.decay == "channel":
        scratch["w"] = cm.tile((C, K), dtype)
    elif plan.decay == "scalar" or plan.has_runs:
        scratch["w"] = cm.tile((C, BV), dtype)
    if plan.has_runs:
        args.append(masks)
        scratch["m"] = cm.vector((D, 2, C))
    if init is not None:
        args.append(init)
    out_type = []
    if store:
        out_type.append(jax.ShapeDtypeStruct((B, H, n, K, V), dtype))
        scratch["out"] = cm.tile((2, K, BV), dtype)
    out_type.append(jax.ShapeDtypeStruct((B, H, P, K, V), F32))
    out = cm.kernel(
        functools.partial(
            _state_kernel, plan=plan, reverse=reverse, store=store, has_init=init is not None
        ),
        out_type=tuple(out_type),
        grid=(V // BV, P, B * H),
        grid_names=("vb", "seg", "bh"),
        scratch=scratch,
        interpret=plan.interpret,
        name="linear_attention_state_grads" if reverse else "linear_attention_states",
    )(*args)
    return (out[0], out[1]) if store else (None, out[0])


def segment_decays(plan: Plan, b_last, carry):
    """Per segment, the product of its chunks' carries ``a_c = exp(b_last) [run_last =
    run_prev]``: ``[B, Hv, P]`` (scalar or no decay) or ``[B, Hv, P, K]`` (per channel).

    ``b_last``: None, ``[B, Hv, n]`` or ``[B, n, Hv, K]``; ``carry``: None or ``[B, n]``
    float (0 across a run change)."""
    B, H, n, P, Ls = plan.batch, plan.v_heads, plan.chunks, plan.segments, plan.segment_chunks
    log = jnp.zeros((B, H, n), F32) if b_last is None else b_last
    if plan.decay == "channel":
        log = jnp.moveaxis(b_last, 1, 2)  # [B, Hv, n, K]
    a = jnp.exp(log.reshape(B, H, P, Ls, *log.shape[3:]).sum(3))
    if carry is not None:
        alive = carry.reshape(B, 1, P, Ls).min(3)
        a = a * (alive[..., None] if a.ndim == 4 else alive)
    return a


def combine(decays, ends, init, *, reverse: bool):
    """The short pass over segments. Forward: ``enter_0 = init``, ``enter_{p+1} = A_p
    enter_p + end_p``; returns ``(enter [B, Hv, P, K, V], final)``. Reverse: ``leave_{P-1}
    = init`` (d final state), ``leave_{p-1} = A_p leave_p + end_p`` (``end_p``: the
    gradient reaching segment ``p``'s start from inside it); returns ``(leave, d
    initial state)``. ``A_p`` scales rows (per channel) or everything (scalar)."""
    ends = jnp.moveaxis(ends, 2, 0)
    decays = jnp.moveaxis(decays, 2, 0)
    if reverse:
        ends, decays = ends[::-1], decays[::-1]
    if decays.ndim == 3:
        decays = decays[..., None, None]
    else:
        decays = decays[..., None]
    start = jnp.zeros(ends.shape[1:], F32) if init is None else init.astype(F32)

    def step(x, inputs):
        a, e = inputs
        return a * x + e, x

    last, entering = lax.scan(step, start, (decays, ends))
    if reverse:
        entering = entering[::-1]
    return jnp.moveaxis(entering, 0, 2), last
