"""The gated delta rule in plain XLA: the token-by-token oracle and the chunked WY form.

Normalised arguments (see ``api.gated_delta_rule``): q and k ``[B, T, Hqk, K]``, v
``[B, T, Hv, V]``; beta ``[B, T, Hv]`` in [0, 1]; ``g`` None or ``[B, T, Hv]`` log decays
(<= 0); ``initial_state`` float32 ``[B, Hv, K, V]`` (zeros when None); ``runs`` None or
``[B, T]`` int32 non-decreasing run indices: the state restarts from zero where the run
index changes. v head ``h`` reads q/k head ``h // (Hv / Hqk)``. Both implementations
return ``(o [B, T, Hv, V] in q's dtype, final_state)`` with

    S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,
    o_t = scale * S_t^T q_t,

computed in float32 (float64 for float64 inputs).

The chunked form (``gated_delta_rule_xla``) runs in three stages, each its own function so
that kernels can mirror them one by one:

  1. ``wy_transform``: per chunk, the UT transform ``T`` and the WY factors ``W``, ``U``;
  2. ``state_pass``: a scan over chunks that turns ``U - W S`` into pseudo-values and
     updates the state as linear attention does with them;
  3. ``linear_attention.reference.output_pass``: linear attention's output pass, with the
     pseudo-values as values.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from seqmix.kernels.linear_attention import reference as la

Array = jax.Array


def masks_nonfinite(impl):
    """A chunked implementation ``impl(q, k, v, beta, g, *, runs, ...)`` made exact for NaN
    and Inf in k, v and beta, as ``linear_attention.reference.masks_nonfinite``: a bad token
    runs as a no-op (zeroed entries, beta 0) and the rows it reaches are NaN."""

    @functools.wraps(impl)
    def exact(q, k, v, beta, g, *, runs, **kwargs):
        (q, k, v, beta, g, _), hit = clean_nonfinite(q, k, v, beta, g, None, runs=runs)
        return la.mark_reached(*impl(q, k, v, beta, g, runs=runs, **kwargs), hit)

    return exact


def masks_nonfinite_if_poisoned(impl):
    """``masks_nonfinite`` at the cost of a check on the final state when no token is bad,
    as ``linear_attention.reference.masks_nonfinite_if_poisoned``: a bad k, v or beta
    enters the final state through products and sums (the UT transform, ``W``, ``U`` and
    the state updates) and leaves it non-finite, so a finite one proves the inputs clean.
    A differentiated call runs the masked path outright (``unless_poisoned``'s
    ``masked_gradients``: its backward measured faster than one inside a cond), and so does
    one with packed runs (the kernels reset by selection)."""
    masked = masks_nonfinite(impl)

    @functools.wraps(impl)
    def exact(q, k, v, beta, g, *, runs, initial_state, **kwargs):
        if runs is not None:
            return masked(q, k, v, beta, g, runs=runs, initial_state=initial_state, **kwargs)

        def as_given(q, k, v, beta, g, s0):
            return impl(q, k, v, beta, g, runs=None, initial_state=s0, **kwargs)

        return la.unless_poisoned(as_given, clean_nonfinite, True, q, k, v, beta, g, initial_state)

    return exact


def clean_nonfinite(q, k, v, beta, g, s0, runs=None):
    """``((q, k, v, beta, g, s0), hit)``: the NaN and Inf entries of k, v and beta zeroed
    and the rows a bad token reaches marked (``la.nonfinite_tokens``; ``unless_poisoned``'s
    ``clean`` with one sequence)."""
    fin_beta = jnp.isfinite(beta)
    k, v, hit = la.nonfinite_tokens(k, v, runs, also=jnp.logical_not(fin_beta))
    beta = jnp.where(fin_beta, beta, jnp.zeros((), beta.dtype))
    return (q, k, v, beta, g, s0), hit


def _resets(runs, B: int, T: int) -> Array:
    """``[B, T]`` bool: True where the run index changes (the state restarts there)."""
    if runs is None:
        return jnp.zeros((B, T), bool)
    return jnp.concatenate([jnp.zeros((B, 1), bool), runs[:, 1:] != runs[:, :-1]], axis=1)


def gated_delta_rule_naive(q, k, v, beta, g, *, scale, initial_state, runs):
    """The recurrence token by token (``lax.scan`` over time): the oracle."""
    out_dtype = q.dtype
    B, T = q.shape[:2]
    q, k, v, g, s0 = la.expand(q, k, v, g, initial_state)  # g [B, T, Hv, 1]
    beta = beta.astype(s0.dtype)

    def step(state, xs):
        qt, kt, vt, bt, gt, rt = xs  # [B, H, K], [B, H, K], [B, H, V], [B, H], [B, H, 1], [B]
        state = jnp.where(rt[:, None, None, None], 0.0, state)
        state = jnp.exp(gt)[..., None] * state  # exp(g_t) S_{t-1}
        pred = jnp.einsum("bhk,bhkv->bhv", kt, state)  # k_t^T exp(g_t) S_{t-1}
        state = state + (bt[..., None] * kt)[..., None] * (vt - pred)[..., None, :]
        return state, scale * jnp.einsum("bhk,bhkv->bhv", qt, state)

    xs = tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, v, beta, g, _resets(runs, B, T)))
    final, o = lax.scan(step, s0, xs)
    return jnp.moveaxis(o, 0, 1).astype(out_dtype), final


def gated_delta_rule_step_reference(q, k, v, beta, state, g, *, scale):
    """One token of the recurrence: q, k ``[B, Hqk, K]``, v ``[B, Hv, V]``, beta
    ``[B, Hv]``, state ``[B, Hv, K, V]``, g None or ``[B, Hv]``. Returns ``(o, new_state)``."""
    o, new_state = gated_delta_rule_naive(
        q[:, None],
        k[:, None],
        v[:, None],
        beta[:, None],
        None if g is None else g[:, None],
        scale=scale,
        initial_state=state,
        runs=None,
    )
    return o[:, 0], new_state


# --- chunked form ----------------------------------------------------------------------------


def unit_lower_inverse(a: Array) -> Array:
    """The inverse of unit lower-triangular matrices ``a [..., C, C]``, by block inversion:
    with ``a = [[A, 0], [B, D]]``, ``a^{-1} = [[A^{-1}, 0], [-D^{-1} B A^{-1}, D^{-1}]]``,
    built bottom-up from 1x1 diagonal blocks (``C`` padded to a power of two with an
    identity block): ``log2 C`` levels of batched matmuls, no sequential substitution, so
    it maps onto matrix units on every platform. For triangular matrices this is as
    accurate as forward substitution, and unlike the Neumann series of the strictly lower
    part it never forms large powers that cancel (beta near 1, aligned keys).
    """
    C = a.shape[-1]
    P = 1 << (C - 1).bit_length()
    lead = a.shape[:-2]
    if P != C:
        pad = [(0, 0)] * len(lead) + [(0, P - C), (0, P - C)]
        a = jnp.pad(a, pad) + jnp.diag((jnp.arange(P) >= C).astype(a.dtype))
    inv = jnp.ones((*lead, P, 1, 1), a.dtype)  # the inverses of the diagonal blocks
    s = 1
    while s < P:
        m = P // (2 * s)
        blocks = a.reshape(*lead, m, 2 * s, m, 2 * s)
        diag = jnp.moveaxis(jnp.diagonal(blocks, axis1=-4, axis2=-2), -1, -3)  # [..., m, 2s, 2s]
        upper, lower = inv[..., 0::2, :, :], inv[..., 1::2, :, :]
        corner = -lower @ diag[..., s:, :s] @ upper
        inv = jnp.concatenate(
            [
                jnp.concatenate([upper, jnp.zeros_like(upper)], axis=-1),
                jnp.concatenate([corner, lower], axis=-1),
            ],
            axis=-2,
        )
        s *= 2
    return inv[..., 0, :C, :C]


def ut_transform(k, beta, b, runs):
    """Stage 1a: ``T = (I + tril(diag(beta) (Gamma * K K^T), -1))^{-1} diag(beta)`` per chunk.

    k ``[B, n, C, H, K]``, beta and b (the inclusive cumulative log decay in the chunk)
    ``[B, n, C, H]``, runs ``[B, n, C]``. ``Gamma_ts = exp(b_t - b_s)`` for ``s < t`` in the
    same run and 0 otherwise (the exponent is masked to -inf before ``exp``, so no positive
    exponent is ever evaluated). Returns ``T [B, n, H, C, C]``, lower triangular.

    Unrolling the recurrence inside a chunk, the pseudo-values
    ``d_t = beta_t (v_t - k_t^T exp(g_t) S_{t-1})`` satisfy
    ``d_t + beta_t sum_{s<t} Gamma_ts (k_t . k_s) d_s = beta_t (v_t - exp(b_t) S_0^T k_t)``,
    a unit lower-triangular system, inverted by ``unit_lower_inverse``.
    """
    C = k.shape[2]
    strict = jnp.tril(jnp.ones((C, C), bool), -1)
    mask = strict & (runs[..., :, None] == runs[..., None, :])  # [B, n, t, s]
    diff = b[:, :, :, None, :] - b[:, :, None, :, :]  # [B, n, t, s, H]
    gamma = jnp.exp(jnp.where(mask[..., None], diff, -jnp.inf))
    kk = jnp.einsum("bnthk,bnshk->bntsh", k, k)
    lower = beta[:, :, :, None, :] * gamma * kk  # [B, n, t, s, H]
    a = jnp.eye(C, dtype=k.dtype) + jnp.moveaxis(lower, -1, 2)  # [B, n, H, t, s]
    return unit_lower_inverse(a) * jnp.moveaxis(beta, -1, 2)[..., None, :]  # (I + L)^-1 diag


def wy_transform(k, v, beta, b, runs, r_prev):
    """Stage 1: ``(w, u)`` with ``W = T (exp(b) * K)`` and ``U = T V`` per chunk.

    k ``[B, n, C, H, K]``, v ``[B, n, C, H, V]``, beta and b ``[B, n, C, H]``, runs
    ``[B, n, C]``, r_prev ``[B, n]`` (the run of the state entering the chunk). Rows of
    tokens outside the entering state's run get no ``exp(b)`` term (their state restarted
    inside the chunk). The pseudo-values of a chunk entered with state ``S`` are then
    ``U - W S``; ``w [B, n, C, H, K]``, ``u [B, n, C, H, V]``.
    """
    T = ut_transform(k, beta, b, runs)
    keep = (runs == r_prev[..., None])[..., None]  # [B, n, C, 1]
    kd = jnp.where(keep, jnp.exp(b), 0.0)[..., None] * k
    w = jnp.einsum("bnhts,bnshk->bnthk", T, kd)
    u = jnp.einsum("bnhts,bnshv->bnthv", T, v)
    return w, u


def state_pass(k, w, u, b, s0, runs, r_last, r_prev):
    """Stage 2: the scan over chunks. For chunk ``c`` entered with ``S_c``:

        v_new = U_c - W_c S_c                                     (pseudo-values)
        S_{c+1} = exp(b_last) S_c + sum_s exp(b_last - b_s) k_s v_new_s^T

    (the first term 0 when the run changes in the chunk; the sum over the tokens of the
    chunk's last run only), i.e. linear attention's state update with ``v_new`` as values.
    Shapes as ``wy_transform``; s0 ``[B, H, K, V]``. Returns ``(v_new [B, n, C, H, V],
    s_in [n, B, H, K, V]`` the states entering the chunks, ``final [B, H, K, V])``.
    """
    b_last = b[:, :, -1]  # [B, n, H]
    keep_k = (runs == r_last[..., None])[..., None]  # [B, n, C, 1]
    kw = jnp.where(keep_k, jnp.exp(b_last[:, :, None] - b), 0.0)[..., None] * k
    carry = jnp.where((r_last == r_prev)[..., None], jnp.exp(b_last), 0.0)  # [B, n, H]

    def step(state, xs):
        w_c, u_c, kw_c, a_c = xs
        v_new = u_c - jnp.einsum("bchk,bhkv->bchv", w_c, state)
        update = jnp.einsum("bchk,bchv->bhkv", kw_c, v_new)
        # where, not a 0 factor: a new run starts from its own tokens whatever the state held
        kept = jnp.where(a_c[..., None, None] > 0, a_c[..., None, None] * state, 0.0)
        return kept + update, (v_new, state)

    xs = tuple(jnp.moveaxis(x, 1, 0) for x in (w, u, kw, carry))
    final, (v_new, s_in) = lax.scan(step, s0, xs)
    return jnp.moveaxis(v_new, 0, 1), s_in, final


@masks_nonfinite
def gated_delta_rule_xla(
    q,
    k,
    v,
    beta,
    g,
    *,
    scale,
    initial_state,
    runs,
    chunk_size=64,
    max_chunk_bytes=1 << 28,
):
    """The chunked form (module docstring): ``wy_transform`` -> ``state_pass`` ->
    linear attention's ``output_pass`` on the pseudo-values.

    Time is zero-padded to a multiple of ``chunk_size`` (padded tokens have beta = 0, so
    they leave the state unchanged) and sliced back. Every ``exp`` takes a difference of
    cumulative log decays inside one chunk, never a positive number: log decays down to
    -20 per token underflow to 0 instead of overflowing. Differentiable by JAX autodiff. A
    NaN or Inf in k, v or beta reaches only the rows it reaches in the recurrence
    (``masks_nonfinite``).
    """
    out_dtype = q.dtype
    B, T = q.shape[:2]
    q, k, v, g, s0 = la.expand(q, k, v, g, initial_state)  # g [B, T, Hv, 1]
    beta = beta.astype(s0.dtype)
    H, V = v.shape[2], v.shape[3]
    C = chunk_size
    n = -(-T // C)
    q, k, v, g, beta = (la.to_chunks(x, n, C) for x in (q, k, v, g, beta))
    runs, r_last, r_prev = la.chunk_runs(runs, B, T, n, C)
    b = jnp.cumsum(g[..., 0], axis=2)  # [B, n, C, H], inclusive, <= 0 and decreasing

    w, u = wy_transform(k, v, beta, b, runs, r_prev)
    v_new, s_in, final = state_pass(k, w, u, b, s0, runs, r_last, r_prev)
    o = la.output_pass(
        q, k, v_new, b[..., None], s_in, runs, r_prev, scale=scale, max_chunk_bytes=max_chunk_bytes
    )
    return o.reshape(B, n * C, H, V)[:, :T].astype(out_dtype), final
