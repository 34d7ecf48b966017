"""Gated linear attention in plain XLA: the token-by-token oracle and the chunked form.

Normalised arguments (see ``api.linear_attention``): q and k ``[B, T, Hqk, K]``, v
``[B, T, Hv, V]``; ``g`` is None, ``[B, T, Hv]`` or ``[B, T, Hv, K]`` float32 log decays;
``initial_state`` float32 ``[B, Hv, K, V]`` (zeros when None); ``runs`` is None or ``[B, T]``
int32 non-decreasing run indices: the state resets where the run index changes. Both
implementations return ``(o [B, T, Hv, V] in q's dtype, final_state float32)`` with

    S_t = exp(g_t) * S_{t-1} + k_t v_t^T,     o_t = scale * q_t^T S_t.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from seqmix.kernels.checks import accum_dtype


def expand(q, k, v, g, initial_state):
    """q/k repeated to v's heads, everything in the accumulation dtype; g as [..., Kg]."""
    acc = accum_dtype(q.dtype)
    B, T, Hqk, K = q.shape
    Hv, V = v.shape[2], v.shape[3]
    rep = Hv // Hqk
    q = jnp.repeat(q.astype(acc), rep, axis=2)
    k = jnp.repeat(k.astype(acc), rep, axis=2)
    v = v.astype(acc)
    if g is None:
        g = jnp.zeros((B, T, Hv, 1), acc)
    elif g.ndim == 3:
        g = g.astype(acc)[..., None]
    else:
        g = g.astype(acc)
    s0 = jnp.zeros((B, Hv, K, V), acc) if initial_state is None else initial_state.astype(acc)
    return q, k, v, g, s0


def nonfinite_tokens(k, v, runs, also=None):
    """``(k, v, hit)`` for a chunked form: the NaN and Inf entries of ``k [B, T, Hk, K]`` and
    ``v [B, T, Hv, V]`` zeroed, and ``hit [B, T, Hv]``, true from a bad token to the end of
    its run. A token is bad for v head ``h`` where its value, the key of ``h``'s group
    (``Hv % Hk == 0``) or ``also [B, T, Hv]`` holds one. The chunked products weigh a later
    token or one of another run by 0, and 0 times NaN is NaN; with the zeroed entries they
    are exact for every row a bad token cannot reach, and ``hit`` marks the rows it does
    reach (NaN, as in the recurrence). Elementwise, so that XLA fuses it into whatever
    produces k and v."""
    fin_k, fin_v = jnp.isfinite(k), jnp.isfinite(v)
    bad_k = jnp.logical_not(jnp.all(fin_k, axis=-1))
    bad = jnp.logical_not(jnp.all(fin_v, axis=-1)) | jnp.repeat(
        bad_k, v.shape[2] // k.shape[2], axis=2
    )
    if also is not None:
        bad = bad | also
    k = jnp.where(fin_k, k, jnp.zeros((), k.dtype))
    v = jnp.where(fin_v, v, jnp.zeros((), v.dtype))
    count = jnp.cumsum(bad.astype(jnp.int32), axis=1)  # [B, T, Hv], bad tokens up to t
    if runs is None:
        return k, v, count > 0
    first = jnp.concatenate(
        [jnp.ones_like(runs[:, :1], bool), runs[:, 1:] != runs[:, :-1]], axis=1
    )[..., None]
    before = jnp.where(first, count - bad.astype(jnp.int32), -1)  # bad tokens before the run
    return k, v, count - lax.cummax(before, axis=1) > 0


def mark_reached(o, final, hit):
    """``o [B, T, Hv, V]`` NaN where ``hit [B, T, Hv]``; ``final`` NaN for the heads whose
    last run holds a bad token."""
    o = jnp.where(hit[..., None], jnp.asarray(jnp.nan, o.dtype), o)
    return o, jnp.where(hit[:, -1, :, None, None], jnp.asarray(jnp.nan, final.dtype), final)


def masks_nonfinite(impl):
    """A chunked implementation ``impl(q, k, v, g, *, runs, ...)`` made exact for NaN and Inf
    in k and v: they never reach a row they cannot reach in the recurrence (a later row of
    the chunk, another run), and the rows they do reach are NaN (``nonfinite_tokens``). The
    kernels run on the zeroed inputs."""

    @functools.wraps(impl)
    def exact(q, k, v, g, *, runs, **kwargs):
        k, v, hit = nonfinite_tokens(k, v, runs)
        return mark_reached(*impl(q, k, v, g, runs=runs, **kwargs), hit)

    return exact


def masks_nonfinite_if_poisoned(impl):
    """``masks_nonfinite`` for a kernel's ``impl(q, k, v, g, *, runs, initial_state, ...)``
    at the cost of a check on its final state when no token is bad.

    Without packed runs every token's k and v enter the final state through products and
    sums (the decay weights, ``k^T v``), and a product or a sum with a NaN or an Inf is not
    finite (0 times Inf is NaN): a bad token leaves the final state non-finite. So the
    kernels run on the inputs as given; a finite final state proves that no token was bad
    and the result is returned as it is, and only a non-finite one (a bad token, a bad
    initial state or an overflow) runs the masked path (``unless_poisoned``). With runs the
    kernels reset the state by selection, which can clear a NaN, so they always take the
    masked path."""
    masked = masks_nonfinite(impl)

    @functools.wraps(impl)
    def exact(q, k, v, g, *, runs, initial_state, **kwargs):
        if runs is not None:
            return masked(q, k, v, g, runs=runs, initial_state=initial_state, **kwargs)

        def as_given(q, k, v, g, s0):
            return impl(q, k, v, g, runs=None, initial_state=s0, **kwargs)

        return unless_poisoned(as_given, clean_nonfinite, False, q, k, v, g, initial_state)

    return exact


def clean_nonfinite(q, k, v, g, s0):
    """``((q, k, v, g, s0), hit)`` with the NaN and Inf entries of k and v zeroed and the
    rows they reach marked (``nonfinite_tokens``, one sequence): ``unless_poisoned``'s
    ``clean``."""
    k, v, hit = nonfinite_tokens(k, v, None)
    return (q, k, v, g, s0), hit


@jax.custom_batching.custom_vmap
def _anywhere(flag):
    return flag


@_anywhere.def_vmap
def _anywhere_vmap(axis_size, in_batched, flag):
    """Under ``vmap`` one flag for the whole batch (any member's): the cond on it stays a
    cond, where a batched predicate would make it a select that runs both paths. A clean
    member on the masked path gets the fast path's results."""
    del axis_size
    return _anywhere(jnp.any(flag) if in_batched[0] else flag), False


def _poisoned(final):
    return _anywhere(jnp.logical_not(jnp.all(jnp.isfinite(final))))


def _masked(fast, clean, args):
    clean_args, hit = clean(*args)
    return mark_reached(*fast(*clean_args), hit)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def unless_poisoned(fast, clean, masked_gradients: bool, *args):
    """``fast(*args)`` (a pair ``(o, final_state)``) where its final state is finite, else
    the masked path ``mark_reached(fast(*clean_args), hit)`` with ``(clean_args, hit) =
    clean(*args)`` (``clean`` zeroes the bad entries and marks the rows they reach).

    The decision is a ``lax.cond`` on a scalar after ``fast`` has run; only the masked
    branch runs the kernels again. Under differentiation the backward is a second cond:
    ``fast``'s own VJP, or the masked path's. With ``masked_gradients`` a differentiated
    call runs the masked path outright instead (forward and backward, no cond), which
    measured faster for the delta rule's backward on the GPU (BENCHMARKS.md, "What exact
    masking costs")."""
    o, final = fast(*args)
    return lax.cond(_poisoned(final), lambda: _masked(fast, clean, args), lambda: (o, final))


def _unless_poisoned_fwd(fast, clean, masked_gradients, *args):
    if masked_gradients:
        out, masked_vjp = jax.vjp(lambda *a: _masked(fast, clean, a), *args)
        return out, (None, masked_vjp, None)
    (o, final), fast_vjp = jax.vjp(fast, *args)
    bad = _poisoned(final)
    out = lax.cond(bad, lambda: _masked(fast, clean, args), lambda: (o, final))
    return out, (bad, fast_vjp, args)


def _unless_poisoned_bwd(fast, clean, masked_gradients, residuals, cotangents):
    bad, vjp, args = residuals
    if masked_gradients:
        return vjp(cotangents)

    def masked():
        return jax.vjp(lambda *a: _masked(fast, clean, a), *args)[1](cotangents)

    return lax.cond(bad, masked, lambda: vjp(cotangents))


unless_poisoned.defvjp(_unless_poisoned_fwd, _unless_poisoned_bwd)


def linear_attention_naive(q, k, v, g, *, scale, initial_state, runs):
    """The recurrence token by token (``lax.scan`` over time)."""
    out_dtype = q.dtype
    B, T = q.shape[:2]
    q, k, v, g, s0 = expand(q, k, v, g, initial_state)
    if runs is None:
        reset = jnp.zeros((B, T), bool)
    else:
        reset = jnp.concatenate([jnp.zeros((B, 1), bool), runs[:, 1:] != runs[:, :-1]], axis=1)

    def step(state, xs):
        qt, kt, vt, gt, rt = xs
        state = jnp.where(rt[:, None, None, None], 0.0, state)
        state = jnp.exp(gt)[..., None] * state + kt[..., None] * vt[..., None, :]
        return state, scale * jnp.einsum("bhk,bhkv->bhv", qt, state)

    xs = tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, v, g, reset))
    final, o = lax.scan(step, s0, xs)
    return jnp.moveaxis(o, 0, 1).astype(out_dtype), final


def linear_attention_step_reference(q, k, v, state, g, *, scale):
    """One token of the recurrence: q, k ``[B, Hqk, K]``, v ``[B, Hv, V]``, state
    ``[B, Hv, K, V]``, g None, ``[B, Hv]`` or ``[B, Hv, K]``. Returns ``(o, new_state)``."""
    o, new_state = linear_attention_naive(
        q[:, None],
        k[:, None],
        v[:, None],
        None if g is None else g[:, None],
        scale=scale,
        initial_state=state,
        runs=None,
    )
    return o[:, 0], new_state


# --- chunked form ----------------------------------------------------------------------------


def to_chunks(x, n: int, C: int):
    """``[B, T, ...]`` zero-padded to ``n * C`` tokens and reshaped to ``[B, n, C, ...]``."""
    B, T = x.shape[:2]
    x = jnp.pad(x, [(0, 0), (0, n * C - T)] + [(0, 0)] * (x.ndim - 2))
    return x.reshape(B, n, C, *x.shape[2:])


def chunk_runs(runs, B: int, T: int, n: int, C: int):
    """``(runs [B, n, C], r_last [B, n], r_prev [B, n])``: every token's run index (padding
    continues the last run), the run of each chunk's last token, and the run of the state
    entering each chunk (the previous chunk's last run; the first token's for chunk 0)."""
    if runs is None:
        runs = jnp.zeros((B, T), jnp.int32)
    runs = jnp.pad(runs, [(0, 0), (0, n * C - T)], mode="edge").reshape(B, n, C)
    r_last = runs[:, :, -1]
    r_prev = jnp.concatenate([runs[:, :1, 0], r_last[:, :-1]], axis=1)
    return runs, r_last, r_prev


def output_pass(q, k, v, b, s_in, runs, r_prev, *, scale, max_chunk_bytes=1 << 28):
    """Stage 3: every chunk's output from the state entering it.

    q, k ``[B, n, C, H, K]`` (q/k heads already repeated to H), v ``[B, n, C, H, V]``, b
    ``[B, n, C, H, Kg]`` the inclusive cumulative log decay inside each chunk, s_in
    ``[n, B, H, K, V]`` the states entering the chunks, runs ``[B, n, C]`` and r_prev
    ``[B, n]`` from ``chunk_runs``. Returns ``[B, n, C, H, V]`` in the accumulation dtype:

        o_t = scale * ([run_t = run_prev] (q_t exp(b_t))^T S_c
                       + sum_{s <= t, run_s = run_t} (q_t . k_s exp(b_t - b_s)) v_s).

    Per-channel decays need a ``[C, C, K]`` decay tensor per chunk; chunks are mapped in
    groups that keep it under ``max_chunk_bytes``.
    """
    B, n, C, H, K = q.shape
    Kg = b.shape[-1]
    causal = jnp.tril(jnp.ones((C, C), bool))

    def chunk_output(xs):
        qc, kc, vc, bc, sc, rc, rp = xs  # [B, C, H, *], sc [B, H, K, V], rc [B, C], rp [B]
        keep_q = (rc == rp[:, None])[..., None, None]
        # where, not a 0 factor: a state of another run never reaches these rows
        o = jnp.where(keep_q, jnp.einsum("bchk,bhkv->bchv", qc * jnp.exp(bc), sc), 0.0)
        mask = causal[None] & (rc[:, :, None] == rc[:, None, :])  # [B, t, s]
        if Kg == 1:
            bh = bc[..., 0]  # [B, C, H]
            diff = bh[:, :, None, :] - bh[:, None, :, :]  # [B, t, s, H]
            decay = jnp.exp(jnp.where(mask[..., None], diff, -jnp.inf))
            att = jnp.einsum("bthk,bshk->btsh", qc, kc) * decay
        else:
            diff = bc[:, :, None] - bc[:, None, :]  # [B, t, s, H, K]
            decay = jnp.exp(jnp.where(mask[..., None, None], diff, -jnp.inf))
            att = jnp.einsum("bthk,bshk,btshk->btsh", qc, kc, decay)
        return scale * (o + jnp.einsum("btsh,bshv->bthv", att, vc))

    per_chunk = B * C * C * H * (K if Kg > 1 else 1) * 4
    batch = max(1, min(n, max_chunk_bytes // max(per_chunk, 1)))
    xs = (q, k, v, b, jnp.moveaxis(s_in, 0, 1), runs, r_prev)
    xs = tuple(jnp.moveaxis(x, 1, 0) for x in xs)
    o = lax.map(chunk_output, xs, batch_size=batch)  # [n, B, C, H, V]
    return jnp.moveaxis(o, 0, 1)


@masks_nonfinite
def linear_attention_xla(
    q, k, v, g, *, scale, initial_state, runs, chunk_size=64, max_chunk_bytes=1 << 28
):
    """Chunked form in three stages, every decay factor ``exp`` of a non-positive number.

    With ``b`` the inclusive cumulative sum of ``g`` inside a chunk of ``C`` tokens:
      1. per-chunk states ``h_c = sum_s exp(b_last - b_s) k_s v_s^T`` (all chunks at once);
      2. the inter-chunk pass ``S_{c+1} = exp(b_last) S_c + h_c`` (a scan over chunks);
      3. per-chunk outputs (``output_pass``): ``(q_t exp(b_t))^T S_c`` plus the intra-chunk
         attention ``sum_{s<=t} (q_t . k_s exp(b_t - b_s)) v_s``.

    A NaN or Inf in k or v reaches only the rows it reaches in the recurrence
    (``masks_nonfinite``).
    """
    out_dtype = q.dtype
    B, T = q.shape[:2]
    q, k, v, g, s0 = expand(q, k, v, g, initial_state)
    H, V = v.shape[2], v.shape[3]
    C = chunk_size
    n = -(-T // C)
    q, k, v, g = (to_chunks(x, n, C) for x in (q, k, v, g))
    runs, r_last, r_prev = chunk_runs(runs, B, T, n, C)

    b = jnp.cumsum(g, axis=2)  # [B, n, C, H, Kg], inclusive, <= 0 and decreasing
    b_last = b[:, :, -1]

    # 1. Per-chunk states.
    keep_k = (runs == r_last[:, :, None])[..., None, None]
    w_k = jnp.where(keep_k, jnp.exp(b_last[:, :, None] - b), 0.0)
    h = jnp.einsum("bnchk,bnchv->bnhkv", k * w_k, v)
    same_run = r_last == r_prev  # [B, n]: the state entering chunk c reaches its end

    # 2. Inter-chunk state pass (a new run starts from h_c alone, whatever the state held).
    def step(state, xs):
        a_c, h_c, same = xs
        return jnp.where(same[:, None, None, None], a_c[..., None] * state, 0.0) + h_c, state

    xs = (jnp.moveaxis(jnp.exp(b_last), 1, 0), jnp.moveaxis(h, 1, 0), jnp.moveaxis(same_run, 1, 0))
    final, s_in = lax.scan(step, s0, xs)

    # 3. Per-chunk outputs.
    o = output_pass(q, k, v, b, s_in, runs, r_prev, scale=scale, max_chunk_bytes=max_chunk_bytes)
    return o.reshape(B, n * C, H, V)[:, :T].astype(out_dtype), final
