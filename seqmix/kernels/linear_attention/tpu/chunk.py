"""The math of one chunk inside the TPU linear-attention kernels (forward and backward).

Values here are VMEM-resident arrays of one chunk of ``C`` tokens and one head: q, k
``[C, Kp]``, v, do ``[C, Vp]`` in the input dtype, g ``[C, Kp]`` (per channel) float32, the
state ``S`` and its cotangent ``dS`` float32 ``[Kp, Vp]``. ``b`` is the inclusive cumulative
sum of ``g`` inside the chunk and ``b_L`` its last value; every ``exp`` below is of a
non-positive number (pairs ``s > t`` are masked before the ``exp``). See the package docstring for
the algorithm and its derivation; this module only uses ops that lower to Mosaic: 2-D values,
static slices at multiples of the sub-chunk, masked reductions instead of transposes of
vectors, sublane rolls, and matmuls with float32 accumulation.

Matmul precision (``_mm``): with bf16 inputs the raw q, k, v, do enter the MXU as they are
(exact), while float32 intermediates (decay-weighted operands, states, score matrices) are
split into bf16 ``hi + lo`` and all products but ``lo x lo`` are summed. That keeps ~2^-16
relative error, so bf16 results match the float32 oracle within bf16 output rounding, at 2
MXU passes (one side exact) or 3 (both split) instead of 6 for a full float32 matmul.
fp16 and float32 inputs use float32 matmuls at HIGHEST precision.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas import tpu as pltpu

Array = jax.Array
F32 = jnp.float32
BF16 = jnp.bfloat16
NN = (((1,), (0,)), ((), ()))  # a @ b
NT = (((1,), (1,)), ((), ()))  # a @ b^T
TN = (((0,), (0,)), ((), ()))  # a^T @ b


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Static description of one call (hashable: it is a custom_vjp nondiff argument)."""

    hv: int
    rep: int  # v heads per q/k head
    kp: int  # padded key dim
    vp: int  # padded value dim
    chunk: int  # C
    sub: int  # c, sub-chunk of the per-channel intra-chunk scores
    n: int  # chunks holding tokens
    m: int  # chunks per grid step
    kind: str  # "none" | "scalar" | "channel"
    has_runs: bool
    has_init: bool
    scale: float
    dtype: str
    interpret: bool

    @property
    def blocks(self) -> int:
        return -(-self.n // self.m)

    @property
    def mxu(self):
        """bf16 for bf16 inputs (with hi/lo splits of float32 operands), else float32."""
        return BF16 if self.dtype == "bfloat16" else F32


# --- building blocks -----------------------------------------------------------------------------


def iota(shape, dim):
    return lax.broadcasted_iota(jnp.int32, shape, dim)


def _dot(a, b, dims):
    prec = lax.Precision.HIGHEST if a.dtype == F32 else None
    return lax.dot_general(a, b, dims, preferred_element_type=F32, precision=prec)


def _split(x):
    hi = x.astype(BF16)
    return hi, (x - hi.astype(F32)).astype(BF16)


def _mm(md, a, b, dims=NN):
    """``a @ b`` (by ``dims``), float32 result; see the module docstring for precision."""
    if md == F32:
        return _dot(a.astype(F32), b.astype(F32), dims)
    pa = (a,) if a.dtype != F32 else _split(a)
    pb = (b,) if b.dtype != F32 else _split(b)
    out = None
    for i, x in enumerate(pa):
        for j, y in enumerate(pb):
            if i + j < 2:
                r = _dot(x, y, dims)
                out = r if out is None else out + r
    return out


def _mul(x, m):
    return x if m is None else x * m


def _weighted(x, w, kind):
    """``x * w`` in float32; ``x`` itself when there is no weight, and the selected rows of
    ``x`` in its own dtype when ``w`` is a 0/1 run mask (no decay): exact MXU operands."""
    if w is None:
        return x
    if kind == "none":
        return jnp.where(w > 0, x, jnp.zeros_like(x))
    return x.astype(F32) * w


def _where(m, x):
    return x if m is None else jnp.where(m, x, 0.0)


def _f32(mask):
    return jnp.where(mask, 1.0, 0.0).astype(F32)


def row_to_col(row):
    """``[1, n] -> [n, 1]`` by a masked lane reduction (no vector transpose)."""
    n = row.shape[1]
    eye = iota((n, n), 0) == iota((n, n), 1)
    return jnp.sum(jnp.where(eye, row, 0.0), axis=1, keepdims=True)


def col_to_row(col):
    """``[n, 1] -> [1, n]`` by a masked sublane reduction."""
    n = col.shape[0]
    eye = iota((n, n), 0) == iota((n, n), 1)
    return jnp.sum(jnp.where(eye, col, 0.0), axis=0, keepdims=True)


def pick_row(rows, i):
    """Row ``i`` (dynamic) of a ``[m, n]`` value, as ``[1, n]``."""
    return jnp.sum(jnp.where(iota(rows.shape, 0) == i, rows, 0.0), axis=0, keepdims=True)


def _col(x, j):
    """Column ``j`` (static) of a ``[r, n]`` value, as ``[r, 1]``."""
    return jnp.sum(jnp.where(iota(x.shape, 1) == j, x, 0.0), axis=1, keepdims=True)


def _cumsum_rows(x, reverse=False):
    """Inclusive (or reverse inclusive) cumulative sum over rows: log2(rows) sublane rolls
    and float32 additions (no MXU pass)."""
    n = x.shape[0]
    rows = iota(x.shape, 0)
    shift = 1
    while shift < n:
        if reverse:  # rolled[t] = x[t + shift]
            x = x + jnp.where(rows < n - shift, pltpu.roll(x, n - shift, 0), 0.0)
        else:  # rolled[t] = x[t - shift]
            x = x + jnp.where(rows >= shift, pltpu.roll(x, shift, 0), 0.0)
        shift *= 2
    return x


# --- masks and decays ----------------------------------------------------------------------------


class Masks(NamedTuple):
    same: Array  # [C, C] bool, rows t, cols s: s <= t and the same run
    same_t: Array  # [C, C] bool, rows s, cols t: the transpose
    keep_q: Array | None  # [C, 1] f32: token t reads the state entering the chunk
    keep_k: Array | None  # [C, 1] f32: token s writes into the state leaving the chunk
    carry: Array | None  # [1, 1] f32: the entering state survives the chunk
    rel: Array | None  # [C, 1] f32: run id relative to the run of the entering state


def masks(C, rel_rows, i) -> Masks:
    """Masks of chunk ``i`` of a block; ``rel_rows [m, C]`` holds relative run ids."""
    row, col = iota((C, C), 0), iota((C, C), 1)
    if rel_rows is None:
        return Masks(row >= col, row <= col, None, None, None, None)
    rel_row = pick_row(rel_rows, i)
    rel = row_to_col(rel_row)
    last = jnp.max(rel_row, axis=1, keepdims=True)
    eq = rel == rel_row
    return Masks(
        (row >= col) & eq,
        (row <= col) & eq,
        _f32(rel == 0),
        _f32(rel == last),
        _f32(last == 0),
        rel,
    )


def _pair_mask(rel_a, rel_b):
    """``[p, 1]`` and ``[r, 1]`` run ids -> ``[p, r]`` same-run mask (None without runs)."""
    return None if rel_a is None else rel_a == col_to_row(rel_b)


class Cum(NamedTuple):
    """A prefix sum of log decays as an unevaluated float32 pair ``hi + lo``.

    Inside a chunk ``b`` reaches ``C * 20`` under strong decay, so ``b_t - b_s`` formed from
    plain float32 sums would carry an absolute error ``~eps * |b|`` (a relative error of
    1e-5 on a decay factor at C = 32). With the compensated pair the difference is as
    accurate as the sum of the decays between s and t, as in the token-by-token oracle."""

    hi: Array
    lo: Array


def _two_sum(a, b):
    """``a + b = s + e`` exactly (Knuth)."""
    s = a + b
    t = s - a
    return s, (a - (s - t)) + (b - t)


def add_cum(x: Cum, y: Cum) -> Cum:
    s, e = _two_sum(x.hi, y.hi)
    lo = x.lo + y.lo + e
    hi = s + lo
    return Cum(hi, lo - (hi - s))


def _cum_rows(x) -> Cum:
    """Compensated inclusive cumulative sum over rows (log2(rows) sublane rolls)."""
    n = x.shape[0]
    rows = iota(x.shape, 0)
    b = Cum(x, jnp.zeros(x.shape, F32))
    shift = 1
    while shift < n:  # rolled[t] = b[t - shift]
        keep = rows >= shift
        b = add_cum(
            b,
            Cum(
                jnp.where(keep, pltpu.roll(b.hi, shift, 0), 0.0),
                jnp.where(keep, pltpu.roll(b.lo, shift, 0), 0.0),
            ),
        )
        shift *= 2
    return b


def _rows(b: Cum, start, stop) -> Cum:
    return Cum(b.hi[start:stop], b.lo[start:stop])


def _exp(b: Cum):
    """``exp(b)`` (b <= 0; its terms matter only while |b| < 88, where hi + lo suffices)."""
    return jnp.exp(b.hi + b.lo)


def _decay(a: Cum, b: Cum, mask=None):
    """``exp(a - b)`` for ``a <= b`` (a later token's prefix sum), 0 where ``mask`` is
    False; the exponent is clamped at 0 against rounding, so nothing exceeds 1."""
    d = jnp.minimum((a.hi - b.hi) + (a.lo - b.lo), 0.0)
    return jnp.exp(d if mask is None else jnp.where(mask, d, -jnp.inf))


class ScalarDecay(NamedTuple):
    b_col: Cum  # [C, 1]
    b_row: Cum  # [1, C]
    b_last: Cum  # [1, 1]


def scalar_decay(bh_rows, bl_rows, i) -> ScalarDecay:
    """``b`` of chunk ``i`` from the block's ``[m, C]`` rows of prefix sums (hi and lo)."""
    hi, lo = pick_row(bh_rows, i), pick_row(bl_rows, i)
    C = hi.shape[1]
    return ScalarDecay(
        Cum(row_to_col(hi), row_to_col(lo)), Cum(hi, lo), Cum(_col(hi, C - 1), _col(lo, C - 1))
    )


def chunk_prefix_sums(g_rows):
    """Compensated inclusive prefix sums of ``[..., C]`` rows (plain jnp: runs in XLA, used
    by the wrapper for scalar decays)."""

    def combine(x, y):
        return tuple(add_cum(Cum(*x), Cum(*y)))

    return lax.associative_scan(combine, (g_rows, jnp.zeros_like(g_rows)), axis=-1)


def _channel_cumsum(g):
    b = _cum_rows(g)
    C = g.shape[0]
    return b, Cum(pick_row(b.hi, C - 1), pick_row(b.lo, C - 1))


# --- forward -------------------------------------------------------------------------------------


def state_out(cfg: KernelConfig, S, k, v, g, dec, msk):
    """The state leaving the chunk: ``exp(b_L) S + (k exp(b_L - b))^T v`` (runs applied)."""
    if cfg.kind == "none":
        kw, a = msk.keep_k, msk.carry
    elif cfg.kind == "scalar":
        kw = _mul(_decay(dec.b_last, dec.b_col), msk.keep_k)
        a = _mul(_exp(dec.b_last), msk.carry)
    else:
        b, b_last = _channel_cumsum(g)
        kw = _mul(_decay(b_last, b), msk.keep_k)
        a = row_to_col(_mul(_exp(b_last), msk.carry))
    return _mul(S, a) + _mm(cfg.mxu, _weighted(k, kw, cfg.kind), v, TN)


def forward_scalar(cfg: KernelConfig, q, k, v, S, dec, msk):
    """``o`` of the chunk for no decay (``dec`` None) or a scalar decay per head."""
    md = cfg.mxu
    if dec is None:
        decay, qw = _f32(msk.same), msk.keep_q
    else:
        decay = _decay(dec.b_col, dec.b_row, msk.same)
        qw = _mul(_exp(dec.b_col), msk.keep_q)
    att = _mm(md, q, k, NT) * decay
    # exp(b_t) scales rows of q: applied after the matmul so q enters it exactly.
    return cfg.scale * (_mul(_mm(md, q, S), qw) + _mm(md, att, v))


def _scratch_row(b_scr, i) -> Cum:
    hi_scr, lo_scr = b_scr
    return Cum(hi_scr[i : i + 1, :], lo_scr[i : i + 1, :])


def _diag_scores(qj, bj, b_scr, kf_scr, lo, c):
    """``D[t, s] = sum_k q_tk k_sk exp(b_tk - b_sk)`` for ``s <= t`` in one sub-chunk."""
    rows, lanes = iota(bj.hi.shape, 0), iota((c, c), 1)
    d = jnp.zeros((c, c), F32)
    for s in range(c):
        ks = kf_scr[lo + s : lo + s + 1, :]
        w = _decay(bj, _scratch_row(b_scr, lo + s), rows >= s)
        d = d + jnp.where(lanes == s, jnp.sum(qj * ks * w, axis=1, keepdims=True), 0.0)
    return d


def forward_channel(cfg: KernelConfig, q, k, v, g, S, msk, acc, bh_scr, bl_scr, kf_scr):
    """``(o, S_out)`` of the chunk for a per-channel decay; ``acc [C, Vp]``, ``bh_scr``,
    ``bl_scr`` (b) and ``kf_scr [C, Kp]`` are float32 VMEM scratch."""
    C, c, md = cfg.chunk, cfg.sub, cfg.mxu
    qf, kf = q.astype(F32), k.astype(F32)
    b, b_last = _channel_cumsum(g)
    b_scr = (bh_scr, bl_scr)
    bh_scr[...], bl_scr[...] = b.hi, b.lo
    kf_scr[...] = kf
    acc[...] = _mm(md, _mul(qf * _exp(b), msk.keep_q), S)
    causal = iota((c, c), 0) >= iota((c, c), 1)
    for j in range(C // c):
        lo, hi = j * c, (j + 1) * c
        bj, vj = _rows(b, lo, hi), v[lo:hi]
        rel_j = None if msk.rel is None else msk.rel[lo:hi]
        if hi < C:  # later sub-chunks: factor at the end of sub-chunk j, both factors <= 1
            r = _scratch_row(b_scr, hi - 1)
            kt = kf[lo:hi] * _decay(r, bj)
            qt = qf[hi:] * _decay(_rows(b, hi, C), r)
            rel_hi = None if msk.rel is None else msk.rel[hi:]
            a = _where(_pair_mask(rel_hi, rel_j), _mm(md, qt, kt, NT))
            acc[hi:, :] += _mm(md, a, vj)
        same = causal if rel_j is None else causal & _pair_mask(rel_j, rel_j)
        d = jnp.where(same, _diag_scores(qf[lo:hi], bj, b_scr, kf_scr, lo, c), 0.0)
        acc[lo:hi, :] += _mm(md, d, vj)
    kw = _mul(_decay(b_last, b), msk.keep_k)
    a_col = row_to_col(_mul(_exp(b_last), msk.carry))
    return cfg.scale * acc[...], a_col * S + _mm(md, kf * kw, v, TN)


# --- backward ------------------------------------------------------------------------------------


def backward_scalar(cfg: KernelConfig, q, k, v, do, S, dS, dec, msk):
    """``(dq, dk, dv, dg [1, C] or None, dS_in)`` of the chunk (no or scalar decay)."""
    md, sc, C = cfg.mxu, cfg.scale, cfg.chunk
    if dec is None:
        decay, decay_t = _f32(msk.same), _f32(msk.same_t)
        qw, kw, a = msk.keep_q, msk.keep_k, msk.carry
    else:
        decay = _decay(dec.b_col, dec.b_row, msk.same)
        decay_t = _decay(dec.b_row, dec.b_col, msk.same_t)
        qw = _mul(_exp(dec.b_col), msk.keep_q)
        kw = _mul(_decay(dec.b_last, dec.b_col), msk.keep_k)
        a = _mul(_exp(dec.b_last), msk.carry)
    # Pairs s < t only; the diagonal s = t enters dq and dk as delta * k and delta * q
    # (decay 1), outside the decay gradient, where it cancels exactly (see _decay_grad).
    row, col = iota((C, C), 0), iota((C, C), 1)
    delta = _diag_coefficient(sc, do, v)
    dp = sc * _mm(md, do, v, NT) * jnp.where(row > col, decay, 0.0)  # rows t, cols s
    dp_t = sc * _mm(md, v, do, NT) * jnp.where(row < col, decay_t, 0.0)  # rows s, cols t
    dq_strict = sc * _mul(_mm(md, do, S, NT), qw) + _mm(md, dp, k)
    dk_intra = _mm(md, dp_t, q)
    dk_state = _mul(_mm(md, v, dS, NT), kw)
    a_t = _mm(md, k, q, NT) * decay_t
    dv = sc * _mm(md, a_t, do) + _mul(_mm(md, k, dS), kw)
    dS_in = sc * _mm(md, _weighted(q, qw, cfg.kind), do, TN) + _mul(dS, a)
    qf, kf = q.astype(F32), k.astype(F32)
    dq, dk = dq_strict + delta * kf, dk_intra + dk_state + delta * qf
    dg = None
    if dec is not None:
        db = jnp.sum(qf * dq_strict - kf * dk_intra, axis=1, keepdims=True)  # [C, 1]
        e = jnp.sum(kf * dk_state, axis=1, keepdims=True)  # [C, 1]
        d0 = _mul(_exp(dec.b_last), msk.carry) * jnp.sum(
            jnp.sum(S * dS, axis=1, keepdims=True), axis=0, keepdims=True
        )
        # dg_u = sum_{t >= u} db_t + sum_{s < u} e_s + d0, rows t/s, cols u
        dg = (
            jnp.sum(
                jnp.where(row >= col, db, 0.0) + jnp.where(row < col, e, 0.0), axis=0, keepdims=True
            )
            + d0
        )
    return dq, dk, dv, dg, dS_in


def _diag_coefficient(sc, do, v):
    """``delta_t = scale * do_t . v_t`` ``[C, 1]``: the coefficient of the s = t pair."""
    return sc * jnp.sum(do.astype(F32) * v.astype(F32), axis=1, keepdims=True)


def _diag_grads(qj, kj, bj, da, da_t, b_scr, qf_scr, kf_scr, lo, c):
    """Diagonal sub-block terms with explicit per-channel decay ``w = exp(b_t - b_s)``,
    ``s <= t``: ``dq_t += da[t, s] k_s w``, ``dk_s += da[t, s] q_t w`` and the scores
    ``A^T[s, t] = q_t . k_s w``."""
    rows, lanes = iota(bj.hi.shape, 0), iota((c, c), 1)
    dq = jnp.zeros(bj.hi.shape, F32)
    dk = jnp.zeros(bj.hi.shape, F32)
    a_t = jnp.zeros((c, c), F32)
    for s in range(c):  # key s, rows t
        ks = kf_scr[lo + s : lo + s + 1, :]
        w = _decay(bj, _scratch_row(b_scr, lo + s), rows >= s)
        dq = dq + _col(da, s) * ks * w
    for t in range(c):  # query t, rows s
        qt = qf_scr[lo + t : lo + t + 1, :]
        w = _decay(_scratch_row(b_scr, lo + t), bj, rows <= t)
        dk = dk + _col(da_t, t) * qt * w
        a_t = a_t + jnp.where(lanes == t, jnp.sum(kj * qt * w, axis=1, keepdims=True), 0.0)
    return dq, dk, a_t


def backward_channel(cfg: KernelConfig, q, k, v, do, g, S, dS, msk, scr):
    """``(dq, dk, dv, dg [C, Kp], dS_in)`` of the chunk for a per-channel decay; ``scr`` are
    float32 VMEM scratch: accumulators dq, dk ``[C, Kp]``, dv ``[C, Vp]``, and b (hi, lo),
    q, k."""
    acc_dq, acc_dk, acc_dv, bh_scr, bl_scr, qf_scr, kf_scr = scr
    C, c, md, sc = cfg.chunk, cfg.sub, cfg.mxu, cfg.scale
    qf, kf = q.astype(F32), k.astype(F32)
    b, b_last = _channel_cumsum(g)
    b_scr = (bh_scr, bl_scr)
    bh_scr[...], bl_scr[...] = b.hi, b.lo
    qf_scr[...] = qf
    kf_scr[...] = kf
    qw = _mul(_exp(b), msk.keep_q)
    kw = _mul(_decay(b_last, b), msk.keep_k)
    a_row = _mul(_exp(b_last), msk.carry)  # [1, Kp]
    dk_state = kw * _mm(md, v, dS, NT)
    acc_dq[...] = sc * qw * _mm(md, do, S, NT)
    acc_dk[...] = jnp.zeros(acc_dk.shape, F32)
    acc_dv[...] = _mm(md, kf * kw, dS)
    eye = iota((c, c), 0) == iota((c, c), 1)
    causal = iota((c, c), 0) >= iota((c, c), 1)
    causal_t = iota((c, c), 0) <= iota((c, c), 1)
    for j in range(C // c):
        lo, hi = j * c, (j + 1) * c
        bj, vj, doj = _rows(b, lo, hi), v[lo:hi], do[lo:hi]
        rel_j = None if msk.rel is None else msk.rel[lo:hi]
        if hi < C:  # later query sub-chunks against key sub-chunk j
            r = _scratch_row(b_scr, hi - 1)
            ek, eq = _decay(r, bj), _decay(_rows(b, hi, C), r)
            kt, qt = kf[lo:hi] * ek, qf[hi:] * eq
            rel_hi = None if msk.rel is None else msk.rel[hi:]
            m_ts, m_st = _pair_mask(rel_hi, rel_j), _pair_mask(rel_j, rel_hi)
            da = _where(m_ts, sc * _mm(md, do[hi:], vj, NT))  # [C - hi, c]
            acc_dq[hi:, :] += _mm(md, da, kt) * eq
            da_t = _where(m_st, sc * _mm(md, vj, do[hi:], NT))  # [c, C - hi]
            acc_dk[lo:hi, :] += _mm(md, da_t, qt) * ek
            a_t = _where(m_st, _mm(md, kt, qt, NT))
            acc_dv[lo:hi, :] += sc * _mm(md, a_t, do[hi:])
        same = causal if rel_j is None else causal & _pair_mask(rel_j, rel_j)
        same_t = causal_t if rel_j is None else causal_t & _pair_mask(rel_j, rel_j)
        # pairs s < t only in dq, dk (the diagonal is added below, outside d log_decay)
        da = jnp.where(same & ~eye, sc * _mm(md, doj, vj, NT), 0.0)  # rows t, cols s
        da_t = jnp.where(same_t & ~eye, sc * _mm(md, vj, doj, NT), 0.0)  # rows s, cols t
        dq_j, dk_j, a_t = _diag_grads(
            qf[lo:hi], kf[lo:hi], bj, da, da_t, b_scr, qf_scr, kf_scr, lo, c
        )
        acc_dq[lo:hi, :] += dq_j
        acc_dk[lo:hi, :] += dk_j
        acc_dv[lo:hi, :] += sc * _mm(md, jnp.where(same_t, a_t, 0.0), doj)
    dq_strict, dk_intra, dv = acc_dq[...], acc_dk[...], acc_dv[...]
    delta = _diag_coefficient(sc, do, v)
    dq = dq_strict + delta * kf
    dk = dk_intra + dk_state + delta * qf
    # dg_u = sum_{t >= u} (q dq' - k dk')_t + sum_{s < u} (k dk_state)_s + d0: written
    # without the terms that cancel (diagonal pairs; k dk_state for s >= u), which would
    # otherwise swamp a small d log_decay with rounding noise under strong decay.
    d0 = a_row * col_to_row(jnp.sum(S * dS, axis=1, keepdims=True))
    dg = (
        _cumsum_rows(qf * dq_strict - kf * dk_intra, reverse=True)
        + _cumsum_rows(_shift_down(kf * dk_state))
        + d0
    )
    dS_in = sc * _mm(md, qf * qw, do, TN) + row_to_col(a_row) * dS
    return dq, dk, dv, dg, dS_in


def _shift_down(x):
    """Rows moved down by one, zero first row (an exclusive cumsum's input)."""
    return jnp.where(iota(x.shape, 0) >= 1, pltpu.roll(x, 1, 0), 0.0)
