"""The intra-chunk WY transform of the delta rule and its gradient, all chunks in parallel.

``wy_forward`` turns every chunk's ``(k, v, beta)`` (and decays) into ``w``, ``u`` (see
``delta_rule.chunk``); ``wy_backward`` takes the gradient of the pseudo-values
``dv_new`` and the chunk's entering state ``S_c`` and returns dk (the WY part), dv, dbeta and
the WY part of d log_decay: with ``v_new = u - w S_c``, ``du = dv_new`` and
``dw = -dv_new S_c^T``. One program per (chunk, batch * v head) holds the chunk's
``[C, K]`` keys and ``[C, V]`` values whole.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from seqmix.kernels.delta_rule import chunk as wy_math
from seqmix.kernels.delta_rule.triton.plan import DeltaPlan
from seqmix.kernels.linear_attention.triton import chunk as tc

f32 = jnp.float32


def dots(plan: DeltaPlan):
    """``(dot, dot32)`` of ``delta_rule.chunk`` for this plan: input-precision operands in
    ``plan.mma``; float32 intermediates in ``plan.wy_mma``."""

    def dot(a, b, trans_a=False, trans_b=False):
        return tc.dot(a, b, plan.mma, trans_a=trans_a, trans_b=trans_b)

    def dot32(a, b, trans_a=False, trans_b=False):
        return tc.dot(a, b, plan.wy_mma, trans_a=trans_a, trans_b=trans_b)

    return dot, dot32


def chunk_masks(plan: DeltaPlan, r_ref, start):
    """``(pair [C, C], keep [C] or None, runs)`` of the chunk at ``start``: strictly causal
    pairs in one run, the tokens that the entering state reaches."""
    C = plan.chunk
    t = jax.lax.broadcasted_iota(jnp.int32, (C, C), 0)
    s = jax.lax.broadcasted_iota(jnp.int32, (C, C), 1)
    pair = t > s
    if not plan.has_runs:
        return pair, None, None
    runs = tc.load_runs(r_ref, start, C, 1)
    return pair & runs.same(0, 0), runs.keep_prev(0), runs


def chunk_decay(plan: DeltaPlan, g_ref):
    """``(b_c [C, 1], b_r [1, C], b [C])``: the inclusive cumulative log decay of the chunk
    (this block of ``g_ref``); Nones without decay."""
    if plan.decay == "none":
        return None, None, None
    b = jnp.cumsum(g_ref[...].astype(f32), axis=0)
    return b[:, None], b[None, :], b


def _chunk(plan: DeltaPlan, beta_ref, g_ref, r_ref):
    """``(pair, keep_c, b_c, b_r, beta_c)`` of this program's chunk (``chunk_masks``,
    ``chunk_decay``; betas and the kept tokens as columns)."""
    start = pl.multiple_of(pl.program_id(0) * plan.chunk, plan.chunk)
    pair, keep, _ = chunk_masks(plan, r_ref, start)
    b_c, b_r, _ = chunk_decay(plan, g_ref)
    keep_c = None if keep is None else keep[:, None]
    return pair, keep_c, b_c, b_r, beta_ref[...].astype(f32)[:, None]


def _store_key_side(dk_ref, dbeta_ref, dg_ref, dk, dbeta, db_c, db_r):
    """dk, dbeta (a column summed) and d log_decay (the reverse cumulative sum of
    ``db_c + db_r^T``) of a chunk."""
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dbeta_ref[...] = jnp.sum(dbeta, axis=1)
    if dg_ref is not None:
        db = jnp.sum(db_c, axis=1) + jnp.sum(db_r, axis=0)
        dg_ref[...] = tc.reverse_cumsum(db)


def _forward_kernel(*refs, plan: DeltaPlan):
    it = iter(refs)
    k_ref, v_ref, beta_ref = next(it), next(it), next(it)
    g_ref = next(it) if plan.decay != "none" else None
    r_ref = next(it) if plan.has_runs else None
    w_ref, u_ref = next(it), next(it)
    pair, keep_c, b_c, b_r, beta_c = _chunk(plan, beta_ref, g_ref, r_ref)
    dot, dot32 = dots(plan)
    w, u = wy_math.wy_forward(
        dot, dot32, k_ref[...], v_ref[...], beta_c, b_c, b_r, pair, keep_c, plan.inverse_block
    )
    w_ref[...] = w.astype(w_ref.dtype)
    u_ref[...] = u.astype(u_ref.dtype)


def _backward_kernel(*refs, plan: DeltaPlan):
    it = iter(refs)
    k_ref, v_ref, beta_ref = next(it), next(it), next(it)
    g_ref = next(it) if plan.decay != "none" else None
    r_ref = next(it) if plan.has_runs else None
    s_ref, dvn_ref = next(it), next(it)
    dk_ref, dv_ref, dbeta_ref = next(it), next(it), next(it)
    dg_ref = next(it) if plan.decay != "none" else None
    pair, keep_c, b_c, b_r, beta_c = _chunk(plan, beta_ref, g_ref, r_ref)
    du = dvn_ref[...].astype(f32)
    dw = -tc.dot(du, s_ref[...], plan.state_mma, trans_b=True)  # -dv_new S_c^T [C, K]
    dot, dot32 = dots(plan)
    dk, dv, dbeta, db_c, db_r = wy_math.wy_backward(
        dot,
        dot32,
        k_ref[...],
        v_ref[...],
        beta_c,
        b_c,
        b_r,
        pair,
        keep_c,
        du,
        dw,
        plan.inverse_block,
    )
    dv_ref[...] = dv.astype(dv_ref.dtype)
    _store_key_side(dk_ref, dbeta_ref, dg_ref, dk, dbeta, db_c, db_r)


def _backward_values_kernel(*refs, plan: DeltaPlan):
    """The value side of the split backward: dv, the values' part of dbeta and ``dM_v``."""
    it = iter(refs)
    k_ref, v_ref, beta_ref = next(it), next(it), next(it)
    g_ref = next(it) if plan.decay != "none" else None
    r_ref = next(it) if plan.has_runs else None
    dvn_ref = next(it)
    dv_ref, dbeta_ref, dm_ref = next(it), next(it), next(it)
    pair, _, b_c, b_r, beta_c = _chunk(plan, beta_ref, g_ref, r_ref)
    dot, dot32 = dots(plan)
    parts = wy_math.transform(dot, dot32, k_ref[...], beta_c, b_c, b_r, pair, plan.inverse_block)
    dv, dbeta, dm = wy_math.wy_backward_values(
        dot32, v_ref[...], beta_c, parts[3], dvn_ref[...].astype(f32)
    )
    dv_ref[...] = dv.astype(dv_ref.dtype)
    dbeta_ref[...] = jnp.sum(dbeta, axis=1)
    dm_ref[...] = dm


def _backward_keys_kernel(*refs, plan: DeltaPlan):
    """The key side of the split backward: dk, the keys' part of dbeta, d log_decay."""
    it = iter(refs)
    k_ref, beta_ref = next(it), next(it)
    g_ref = next(it) if plan.decay != "none" else None
    r_ref = next(it) if plan.has_runs else None
    s_ref, dvn_ref, dm_ref = next(it), next(it), next(it)
    dk_ref, dbeta_ref = next(it), next(it)
    dg_ref = next(it) if plan.decay != "none" else None
    pair, keep_c, b_c, b_r, beta_c = _chunk(plan, beta_ref, g_ref, r_ref)
    k = k_ref[...]
    dw = -tc.dot(dvn_ref[...].astype(f32), s_ref[...], plan.state_mma, trans_b=True)
    dot, dot32 = dots(plan)
    parts = wy_math.transform(dot, dot32, k, beta_c, b_c, b_r, pair, plan.inverse_block)
    dk, dbeta, db_c, db_r = wy_math.wy_backward_keys(
        dot32, k, beta_c, b_c, pair, keep_c, parts, dw, dm_ref[...]
    )
    _store_key_side(dk_ref, dbeta_ref, dg_ref, dk, dbeta, db_c, db_r)


class _Specs:
    """BlockSpecs over the grid ``(chunk, batch * v head)``: whole key / value rows."""

    def __init__(self, plan: DeltaPlan):
        self.p = plan

    def qk(self):
        p = self.p
        return pl.BlockSpec(
            (None, p.chunk, None, p.key_dim), lambda c, bh: (p.heads(bh)[0], c, p.heads(bh)[2], 0)
        )

    def per_v_head(self, width):
        p = self.p
        return pl.BlockSpec(
            (None, p.chunk, None, width), lambda c, bh: (p.heads(bh)[0], c, p.heads(bh)[1], 0)
        )

    def token(self):
        p = self.p
        return pl.BlockSpec(
            (None, p.chunk, None), lambda c, bh: (p.heads(bh)[0], c, p.heads(bh)[1])
        )

    def runs(self):
        p = self.p
        return pl.BlockSpec((None, p.time), lambda c, bh: (p.heads(bh)[0], 0))

    def state(self):
        p = self.p
        return pl.BlockSpec(
            (None, None, None, p.key_dim, p.value_dim), lambda c, bh: p.heads(bh)[:2] + (c, 0, 0)
        )


def _inputs(sp: _Specs, k, v, beta, g, runs):
    """Specs and arguments ``k, [v,] beta[, g][, runs]`` (v None: left out)."""
    specs, args = [sp.qk(), sp.token()], [k, beta]
    if v is not None:
        specs.insert(1, sp.per_v_head(sp.p.value_dim))
        args.insert(1, v)
    if g is not None:
        specs.append(sp.token())
        args.append(g)
    if runs is not None:
        specs.append(sp.runs())
        args.append(runs)
    return specs, args


def wy_forward(plan: DeltaPlan, k, v, beta, g, runs):
    """``(w [B, T, Hv, K], u [B, T, Hv, V])`` float32 from padded inputs."""
    B, T, Hv, K, V = plan.batch, plan.time, plan.v_heads, plan.key_dim, plan.value_dim
    sp = _Specs(plan)
    specs, args = _inputs(sp, k, v, beta, g, runs)
    return pl.pallas_call(
        functools.partial(_forward_kernel, plan=plan),
        grid=(plan.chunks, B * Hv),
        in_specs=specs,
        out_specs=[sp.per_v_head(K), sp.per_v_head(V)],
        out_shape=[
            jax.ShapeDtypeStruct((B, T, Hv, K), f32),
            jax.ShapeDtypeStruct((B, T, Hv, V), f32),
        ],
        compiler_params=plan.compiler_params("wy"),
        interpret=plan.interpret,
        name="gated_delta_rule_wy",
    )(*args)


def wy_backward(plan: DeltaPlan, k, v, beta, g, runs, states, dv_new):
    """``(dk [B, T, Hv, K] float32 per v head, dv [B, T, Hv, V] in v's dtype, dbeta
    [B, T, Hv] float32, dg [B, T, Hv] float32 or None)``: the WY transform's part of the
    gradients, from the chunk states ``[B, Hv, n, K, V]`` and ``dv_new [B, T, Hv, V]``."""
    if plan.split_wy_backward:
        return _wy_backward_split(plan, k, v, beta, g, runs, states, dv_new)
    B, T, Hv, K, V = plan.batch, plan.time, plan.v_heads, plan.key_dim, plan.value_dim
    sp = _Specs(plan)
    specs, args = _inputs(sp, k, v, beta, g, runs)
    specs += [sp.state(), sp.per_v_head(V)]
    args += [states, dv_new]
    out_specs = [sp.per_v_head(K), sp.per_v_head(V), sp.token()]
    out_shape = [
        jax.ShapeDtypeStruct((B, T, Hv, K), f32),
        jax.ShapeDtypeStruct((B, T, Hv, V), v.dtype),
        jax.ShapeDtypeStruct((B, T, Hv), f32),
    ]
    if g is not None:
        out_specs.append(sp.token())
        out_shape.append(jax.ShapeDtypeStruct((B, T, Hv), f32))
    out = pl.pallas_call(
        functools.partial(_backward_kernel, plan=plan),
        grid=(plan.chunks, B * Hv),
        in_specs=specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=plan.compiler_params("dwy"),
        interpret=plan.interpret,
        name="gated_delta_rule_wy_backward",
    )(*args)
    return out[0], out[1], out[2], (out[3] if g is not None else None)


def _wy_backward_split(plan: DeltaPlan, k, v, beta, g, runs, states, dv_new):
    """``wy_backward`` as two kernels (``TritonConfig.wy_backward="split"``): the value side
    writes ``dM_v = du (beta v)^T`` per chunk (``[B, T, Hv, C]``: a chunk's C rows of C
    columns), which the key side reads; each holds about half the fused kernel's tiles."""
    B, T, Hv, K, V, C = (
        plan.batch,
        plan.time,
        plan.v_heads,
        plan.key_dim,
        plan.value_dim,
        plan.chunk,
    )
    sp = _Specs(plan)
    specs, args = _inputs(sp, k, v, beta, g, runs)
    dv, dbeta_v, dm_v = pl.pallas_call(
        functools.partial(_backward_values_kernel, plan=plan),
        grid=(plan.chunks, B * Hv),
        in_specs=specs + [sp.per_v_head(V)],
        out_specs=[sp.per_v_head(V), sp.token(), sp.per_v_head(C)],
        out_shape=[
            jax.ShapeDtypeStruct((B, T, Hv, V), v.dtype),
            jax.ShapeDtypeStruct((B, T, Hv), f32),
            jax.ShapeDtypeStruct((B, T, Hv, C), f32),
        ],
        compiler_params=plan.compiler_params("dwy"),
        interpret=plan.interpret,
        name="gated_delta_rule_wy_backward_values",
    )(*args, dv_new)
    specs, args = _inputs(sp, k, None, beta, g, runs)
    out_specs = [sp.per_v_head(K), sp.token()]
    out_shape = [jax.ShapeDtypeStruct((B, T, Hv, K), f32), jax.ShapeDtypeStruct((B, T, Hv), f32)]
    if g is not None:
        out_specs.append(sp.token())
        out_shape.append(jax.ShapeDtypeStruct((B, T, Hv), f32))
    out = pl.pallas_call(
        functools.partial(_backward_keys_kernel, plan=plan),
        grid=(plan.chunks, B * Hv),
        in_specs=specs + [sp.state(), sp.per_v_head(V), sp.per_v_head(C)],
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=plan.compiler_params("dwy"),
        interpret=plan.interpret,
        name="gated_delta_rule_wy_backward_keys",
    )(*args, states, dv_new, dm_v)
    return out[0], dv, dbeta_v + out[1], (out[2] if g is not None else None)
