"""The WY (UT) transform of one chunk and its gradient, as array code shared by the Pallas
kernels (Triton and TPU); each backend supplies its matmul.

For a chunk of ``C`` tokens with keys ``k [C, K]``, values ``v [C, V]``, writing strengths
``beta`` and ``b`` the inclusive cumulative log decay inside the chunk (0 without decay):

    A    = beta_t exp(b_t - b_s) (k_t . k_s)    over ``pair`` (s < t, same run), else 0
    M    = (I + A)^{-1}                          (unit lower triangular)
    w    = M (beta exp(b) k) [keep]              u = M (beta v)

where ``keep`` marks the tokens that the state entering the chunk reaches (its run). The
pseudo-values of a chunk entered with state ``S`` are ``v_new = u - w S``
(``reference.wy_transform``). Every array is 2-D float32: per-token vectors are columns
``[C, 1]`` (``_c``) or rows ``[1, C]`` (``_r``), so that the same code lowers on Triton
and Mosaic TPU.

``dot(a, b, trans_a=False, trans_b=False)`` is the backend's float32-result matmul of
input-precision operands; ``dot32`` the same for float32 intermediates (the inverse).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

f32 = jnp.float32


def iota(shape, axis: int):
    return lax.broadcasted_iota(jnp.int32, shape, axis)


def _float(x):
    return x.astype(jnp.promote_types(x.dtype, f32))


def masked_exp(mask, x):
    """``exp(x)`` where ``mask``, else 0; masked entries never reach the exponential."""
    return jnp.exp(jnp.where(mask, x, -jnp.inf))


def unit_lower_inverse(a: jax.Array) -> jax.Array:
    """``(I + a)^{-1}`` of a strictly lower triangular ``a [C, C]`` by Gaussian elimination,
    one column per step: ``N <- N - a[:, j] N[j, :]`` from ``N = I`` (row ``j`` of ``N`` is
    final once the columns before ``j`` are eliminated; ``a``'s own columns never change).
    A step is ``O(C^2)`` elementwise work on registers (the column of ``a`` and the row of
    ``N`` picked by masked reductions), so the loop needs no dynamic indexing of values and
    no transpose; as accurate as forward substitution."""
    C = a.shape[0]
    rows, cols = iota((C, C), 0), iota((C, C), 1)

    def body(j, n):
        a_j = jnp.sum(jnp.where(cols == j, a, 0.0), axis=1, keepdims=True)  # [C, 1]: a[i, j]
        n_j = jnp.sum(jnp.where(rows == j, n, 0.0), axis=0, keepdims=True)  # [1, C]: N[j, :]
        return n - a_j * n_j

    return lax.fori_loop(0, C, body, jnp.where(rows == cols, 1.0, 0.0).astype(a.dtype))


def unit_lower_inverse_blocked(a: jax.Array, dot32: Callable, block: int = 16) -> jax.Array:
    """``(I + a)^{-1}`` as ``unit_lower_inverse``, by blocks: the ``block x block`` diagonal
    blocks all at once by the same elimination (``block`` steps instead of ``C``), then block
    forward substitution, one block row at a time, with matmuls:
    ``M_i = D_i (E_i - sum_{j<i} A_ij M_j)`` where ``D_i`` is diagonal block ``i``'s inverse
    (as stable as substitution: no power of ``a`` is formed). Every array stays ``[C, C]``
    (masks pick the blocks), so the code needs no slicing of register tiles."""
    C = a.shape[0]
    if block >= C:
        return unit_lower_inverse(a)
    if C % block:
        raise ValueError(f"the chunk ({C}) must be a multiple of the inverse's block ({block})")
    rows, cols = iota((C, C), 0), iota((C, C), 1)
    rb, cb = rows // block, cols // block
    same = rb == cb
    a_diag = jnp.where(same, a, 0.0)

    def body(j, n):  # step j of every diagonal block's elimination
        a_j = jnp.sum(jnp.where(cols == rb * block + j, a_diag, 0.0), axis=1, keepdims=True)
        n_j = jnp.sum(jnp.where(rows == cb * block + j, n, 0.0), axis=0, keepdims=True)
        return n - jnp.where(same, a_j * n_j, 0.0)

    eye = jnp.where(rows == cols, 1.0, 0.0).astype(a.dtype)
    d = lax.fori_loop(0, block, body, eye)  # block-diagonal: the blocks' inverses
    lower = jnp.where(rb > cb, a, 0.0)  # the blocks below the diagonal
    m = jnp.where(rb == 0, d, 0.0)
    for i in range(1, C // block):  # block rows < i of m are final, the others 0
        r = jnp.where(rb == i, eye - dot32(lower, m), 0.0)
        m = m + dot32(d, r)
    return m


def scores(dot: Callable, k, beta_c, b_c, b_r, pair):
    """``(A, gamma, kk)``: the strictly lower ``A`` above, ``gamma = exp(b_t - b_s)`` over
    ``pair`` (0 elsewhere) and ``kk = k k^T``."""
    kk = dot(k, k, trans_b=True)
    gamma = jnp.where(pair, 1.0, 0.0) if b_c is None else masked_exp(pair, b_c - b_r)
    return beta_c * gamma * kk, gamma, kk


def decayed_keys(k, beta_c, b_c, keep_c):
    """``beta exp(b) k`` on the tokens the entering state reaches, 0 elsewhere."""
    f = beta_c if b_c is None else beta_c * jnp.exp(b_c)
    if keep_c is not None:
        f = jnp.where(keep_c, f, 0.0)
    return f * _float(k)


def inverse(a, dot32: Callable, block: int = 0):
    """``(I + a)^{-1}``: by elimination (``block`` 0) or by blocks of ``block`` rows."""
    return unit_lower_inverse_blocked(a, dot32, block) if block else unit_lower_inverse(a)


def wy_forward(
    dot: Callable, dot32: Callable, k, v, beta_c, b_c, b_r, pair, keep_c, inverse_block: int = 0
):
    """``(w [C, K], u [C, V])`` float32 of one chunk (module docstring)."""
    a, _, _ = scores(dot, k, beta_c, b_c, b_r, pair)
    m = inverse(a, dot32, inverse_block)
    w = dot32(m, decayed_keys(k, beta_c, b_c, keep_c))
    u = dot32(m, beta_c * _float(v))
    return w, u


def transform(dot: Callable, dot32: Callable, k, beta_c, b_c, b_r, pair, block: int = 0):
    """``(a, gamma, kk, m)`` of one chunk: ``scores`` and ``M = (I + A)^{-1}``."""
    a, gamma, kk = scores(dot, k, beta_c, b_c, b_r, pair)
    return a, gamma, kk, inverse(a, dot32, block)


def wy_backward_values(dot32: Callable, v, beta_c, m, du):
    """The value side of ``wy_backward``: ``(dv [C, V], dbeta_v [C, 1], dm_v [C, C])``, the
    gradient of ``v``, the values' part of ``dbeta`` and of ``dM`` (``du (beta v)^T``)."""
    vf = _float(v)
    d_vals = dot32(m, du, trans_a=True)  # M^T du
    dm_v = dot32(du, beta_c * vf, trans_b=True)
    return beta_c * d_vals, jnp.sum(d_vals * vf, axis=1, keepdims=True), dm_v


def wy_backward_keys(dot32: Callable, k, beta_c, b_c, pair, keep_c, parts, dw, dm_v):
    """The key side of ``wy_backward`` given ``parts = transform(...)`` and the value side's
    ``dm_v``: ``(dk [C, K], dbeta_k [C, 1], db_c [C, 1], db_r [1, C])``."""
    a, gamma, kk, m = parts
    kf = _float(k)
    e = decayed_keys(k, beta_c, b_c, keep_c)
    d_keys = dot32(m, dw, trans_a=True)  # M^T dw
    dm = dm_v + dot32(dw, e, trans_b=True)
    da = -dot32(dot32(m, dm, trans_a=True), m, trans_b=True)
    da = jnp.where(pair, da, 0.0)
    ek = jnp.sum(d_keys * kf, axis=1, keepdims=True)  # (M^T dw)_t . k_t
    f = jnp.ones_like(beta_c) if b_c is None else jnp.exp(b_c)
    if keep_c is not None:
        f = jnp.where(keep_c, f, 0.0)
    dbeta_k = f * ek + jnp.sum(da * gamma * kk, axis=1, keepdims=True)
    dkk = da * beta_c * gamma  # d (k_t . k_s)
    dk = beta_c * f * d_keys + dot32(dkk, kf) + dot32(dkk, kf, trans_a=True)
    db_c = db_r = None
    if b_c is not None:
        da_a = da * a
        db_c = beta_c * f * ek + jnp.sum(da_a, axis=1, keepdims=True)
        db_r = -jnp.sum(da_a, axis=0, keepdims=True)
    return dk, dbeta_k, db_c, db_r


def wy_backward(
    dot: Callable,
    dot32: Callable,
    k,
    v,
    beta_c,
    b_c,
    b_r,
    pair,
    keep_c,
    du,
    dw,
    inverse_block: int = 0,
):
    """Gradients of one chunk's ``(w, u)`` given ``dw [C, K]`` and ``du [C, V]``:
    ``(dk [C, K], dv [C, V], dbeta [C, 1], db_c [C, 1], db_r [1, C])`` float32, where the
    gradient of ``b`` is ``db_c + db_r^T`` (the row part comes from the key side ``b_s``).

    With ``D = beta v``, ``E = beta exp(b) k [keep]``: ``du -> dD = M^T du``,
    ``dE = M^T dw``, ``dM = du D^T + dw E^T``, ``dA = -M^T dM M^T`` on ``pair``. The value
    side (``wy_backward_values``) and the key side (``wy_backward_keys``) meet in ``dM``;
    a backend may run them as two kernels, each holding half the tiles.
    """
    parts = transform(dot, dot32, k, beta_c, b_c, b_r, pair, inverse_block)
    dv, dbeta_v, dm_v = wy_backward_values(dot32, v, beta_c, parts[3], du)
    dk, dbeta_k, db_c, db_r = wy_backward_keys(dot32, k, beta_c, b_c, pair, keep_c, parts, dw, dm_v)
    return dk, dv, dbeta_v + dbeta_k, db_c, db_r
