"""Mamba-1's selective scan in plain XLA: the token-by-token oracle and an associative scan.

Normalised arguments (see ``api.selective_scan``): u, delta ``[B, T, Dm]``; A ``[Dm, N]``;
B, C ``[B, T, G, N]`` (channel ``d`` reads group ``d // (Dm // G)``); D ``[Dm]`` or None;
z ``[B, T, Dm]`` or None; delta_bias ``[Dm]`` or None; initial_state float32
``[B, Dm, N]`` or None. Both return ``(y [B, T, Dm] in u's dtype, final_state float32)``::

    dt_t = softplus(delta_t + delta_bias)   (without softplus when not asked)
    h_t  = exp(dt_t A) * h_{t-1} + dt_t B_t u_t
    y_t  = C_t . h_t + D u_t,   then y_t *= silu(z_t)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from seqmix.kernels.checks import accum_dtype


def discretize(delta, delta_bias, delta_softplus, acc):
    """dt ``[B, T, Dm]`` in the accumulation dtype."""
    dt = delta.astype(acc)
    if delta_bias is not None:
        dt = dt + delta_bias.astype(acc)
    if delta_softplus:
        dt = jax.nn.softplus(dt)
    return dt


def _per_channel(x, Dm):
    """``[B, T, G, N]`` -> ``[B, T, Dm, N]``: channel d reads group d // (Dm // G)."""
    return jnp.repeat(x, Dm // x.shape[2], axis=2)


def _finish(y, u, D, z, acc):
    if D is not None:
        y = y + D.astype(acc) * u.astype(acc)
    if z is not None:
        y = y * jax.nn.silu(z.astype(acc))
    return y.astype(u.dtype)


def selective_scan_naive(u, delta, A, B, C, D, z, *, delta_bias, delta_softplus, initial_state):
    """The recurrence token by token."""
    acc = accum_dtype(u.dtype)
    Bsz, _T, Dm = u.shape
    N = A.shape[1]
    dt = discretize(delta, delta_bias, delta_softplus, acc)
    Bc = _per_channel(B.astype(acc), Dm)
    Cc = _per_channel(C.astype(acc), Dm)
    h0 = jnp.zeros((Bsz, Dm, N), acc) if initial_state is None else initial_state.astype(acc)
    Af = A.astype(acc)

    def step(h, xs):
        dt_t, u_t, b_t, c_t = xs
        h = jnp.exp(dt_t[..., None] * Af) * h + (dt_t * u_t)[..., None] * b_t
        return h, jnp.sum(h * c_t, axis=-1)

    xs = (dt, u.astype(acc), Bc, Cc)
    final, y = lax.scan(step, h0, tuple(jnp.moveaxis(x, 1, 0) for x in xs))
    return _finish(jnp.moveaxis(y, 0, 1), u, D, z, acc), final


def selective_scan_xla(u, delta, A, B, C, D, z, *, delta_bias, delta_softplus, initial_state):
    """``lax.associative_scan`` over time of the pairs (exp(dt A), dt B u)."""
    acc = accum_dtype(u.dtype)
    Dm = u.shape[2]
    dt = discretize(delta, delta_bias, delta_softplus, acc)
    a = jnp.exp(dt[..., None] * A.astype(acc))  # [B, T, Dm, N]
    b = (dt * u.astype(acc))[..., None] * _per_channel(B.astype(acc), Dm)
    if initial_state is not None:
        b = b.at[:, 0].add(a[:, 0] * initial_state.astype(acc))

    def combine(left, right):
        a_l, b_l = left
        a_r, b_r = right
        return a_l * a_r, a_r * b_l + b_r

    _, h = lax.associative_scan(combine, (a, b), axis=1)
    y = jnp.einsum("btdn,btdn->btd", h, _per_channel(C.astype(acc), Dm))
    return _finish(y, u, D, z, acc), h[:, -1]
