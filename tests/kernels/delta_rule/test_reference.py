"""gated_delta_rule: the oracle against a float64 loop, the chunked forms exact in float64,
segments, long sequences (the case tables of every implementation against the oracle are in
``cases.py``)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqmix import testing
from seqmix.kernels import gated_delta_rule

# The chunked implementations checked exactly in float64 (the Pallas kernels compute in
# float32 at most).
CHUNKED = ("xla",)

# Jitted entry points (one compilation per shape instead of one per primitive).
op = jax.jit(
    gated_delta_rule,
    static_argnames=("scale", "return_final_state", "chunk_size", "implementation"),
)


def _inputs(seed, B, T, Hqk, Hv, K, V, *, decay=True, g_min=-1.0, beta=(0.0, 1.0), dtype=None):
    """Random q, v, L2-normalised k (as the layers give), beta in ``beta``, log decays in
    ``[g_min, 0]`` (None without decay) and an initial state."""
    ks = jax.random.split(jax.random.key(seed), 6)
    q = jax.random.normal(ks[0], (B, T, Hqk, K), jnp.float32)
    k = jax.random.normal(ks[1], (B, T, Hqk, K), jnp.float32)
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    v = jax.random.normal(ks[2], (B, T, Hv, V), jnp.float32)
    if dtype is not None:
        q, k, v = (x.astype(dtype) for x in (q, k, v))
    b = jax.random.uniform(ks[3], (B, T, Hv), jnp.float32, *beta)
    g = jax.random.uniform(ks[4], (B, T, Hv), jnp.float32, g_min, 0.0) if decay else None
    s0 = jax.random.normal(ks[5], (B, Hv, K, V), jnp.float32)
    return q, k, v, b, g, s0


def _segments(seed, B, T):
    return jnp.sort(jax.random.randint(jax.random.key(seed + 7), (B, T), 0, 4), axis=1)


def _op(impl, *, chunk, segment_ids=None, decay=True, initial=True):
    """The op as a function of its differentiable arguments (q, k, v, beta[, g][, s0])."""

    def f(q, k, v, beta, *rest):
        rest = list(rest)
        g = rest.pop(0) if decay else None
        s0 = rest.pop(0) if initial else None
        return gated_delta_rule(
            q,
            k,
            v,
            beta,
            g,
            initial_state=s0,
            return_final_state=True,
            segment_ids=segment_ids,
            chunk_size=chunk,
            implementation=impl,
        )

    return f


def _float64_loop(q, k, v, beta, g, s0, segment_ids, scale):
    """The recurrence in numpy float64, one head at a time."""
    q, k, v, beta = (np.asarray(x, np.float64) for x in (q, k, v, beta))
    g = np.zeros(beta.shape) if g is None else np.asarray(g, np.float64)
    S = np.asarray(s0, np.float64).copy()
    seg = None if segment_ids is None else np.asarray(segment_ids)
    B, T, Hqk, _ = q.shape
    Hv = v.shape[2]
    o = np.zeros(v.shape)
    for b in range(B):
        for t in range(T):
            if seg is not None and t > 0 and seg[b, t] != seg[b, t - 1]:
                S[b] = 0.0
            for h in range(Hv):
                kt, qt = k[b, t, h // (Hv // Hqk)], q[b, t, h // (Hv // Hqk)]
                decayed = np.exp(g[b, t, h]) * (
                    S[b, h] - beta[b, t, h] * np.outer(kt, kt @ S[b, h])
                )
                S[b, h] = decayed + beta[b, t, h] * np.outer(kt, v[b, t, h])
                o[b, t, h] = scale * qt @ S[b, h]
    return o, S


def test_naive_matches_a_float64_loop():
    """The oracle is the recurrence: groups, segment resets, an initial state, decay."""
    seed = testing.fresh_seed()
    q, k, v, beta, g, s0 = _inputs(seed, 2, 13, 1, 2, 4, 3, g_min=-3.0)
    seg = _segments(seed, 2, 13)
    o, final = gated_delta_rule(
        q,
        k,
        v,
        beta,
        g,
        scale=0.7,
        initial_state=s0,
        return_final_state=True,
        segment_ids=seg,
        implementation="naive",
    )
    o_ref, s_ref = _float64_loop(q, k, v, beta, g, s0, seg, 0.7)
    testing.assert_close(o, o_ref, 1e-5, f"output (seed {seed})")
    testing.assert_close(final, s_ref, 1e-5, f"final state (seed {seed})")


@pytest.mark.parametrize("impl", CHUNKED)
def test_chunked_is_exact_in_float64(impl):
    """In float64 the chunked form equals the recurrence to 1e-9 (outputs, state, gradients):
    the algebra is exact, not merely within float32 noise."""
    seed = testing.fresh_seed()
    with jax.enable_x64(True):
        args = [jnp.asarray(x, jnp.float64) for x in _inputs(seed, 1, 21, 1, 2, 4, 4, g_min=-4.0)]
        seg = _segments(seed, 1, 21)
        kw = dict(chunk=8, segment_ids=seg)
        testing.check_against(
            _op(impl, **kw),
            _op("naive", **kw),
            args,
            argnums=range(6),
            tol=testing.tolerance(jnp.float64),
            seed=seed,
            names=["q", "k", "v", "beta", "log_decay", "initial_state"],
        )


def test_segments_restart_from_zero_inside_a_chunk():
    """A packed row equals its segments run separately: the first from the initial state,
    the others from zero, with resets in the middle of chunks."""
    seed = testing.fresh_seed()
    q, k, v, beta, g, s0 = _inputs(seed, 1, 30, 1, 1, 8, 8)
    bounds = [(0, 11), (11, 13), (13, 30)]
    seg = jnp.array([[0] * 11 + [1] * 2 + [2] * 17])
    packed = op(
        q, k, v, beta, g, initial_state=s0, segment_ids=seg, chunk_size=8, implementation="xla"
    )
    pieces = [
        op(
            q[:, a:b],
            k[:, a:b],
            v[:, a:b],
            beta[:, a:b],
            g[:, a:b],
            initial_state=s0 if a == 0 else None,
            chunk_size=8,
            implementation="xla",
        )
        for a, b in bounds
    ]
    testing.assert_close(packed, jnp.concatenate(pieces, axis=1), 1e-5)


def test_long_sequence_with_strong_decay_stays_finite_and_exact():
    """T = 65536, log decays down to -20 and beta near 1, float32: the chunked form stays
    finite (outputs, final state and gradients) and matches the oracle."""
    seed = testing.fresh_seed()
    q, k, v, beta, g, _ = _inputs(seed, 1, 65536, 1, 1, 8, 8, g_min=-20.0, beta=(0.9, 1.0))

    def loss(q, k, v, beta, g):
        o, s = gated_delta_rule(q, k, v, beta, g, return_final_state=True, implementation="xla")
        return jnp.sum(o.astype(jnp.float32) ** 2) + jnp.sum(s**2), (o, s)

    grads, (o, s) = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True))(q, k, v, beta, g)
    for x in (o, s, *grads):
        assert np.all(np.isfinite(np.asarray(x)))
    o_ref, s_ref = jax.jit(
        lambda *a: gated_delta_rule(*a, return_final_state=True, implementation="naive")
    )(q, k, v, beta, g)
    testing.assert_close(o, o_ref, 1e-5, f"output (seed {seed})")
    # The chunked form decays by exp of float32 cumulative sums of g over a chunk (down to
    # -20 x 64 here), whose rounding (~6e-8 x 1280) bounds its relative error near 1e-4;
    # measured up to 1.7e-5 on the final state, while the sequential oracle stays within
    # 1e-7 of a float64 run.
    testing.assert_close(s, s_ref, 1e-4, f"final state (seed {seed})")


@pytest.mark.parametrize("C, block", [(32, 16), (64, 16), (64, 32)])
@pytest.mark.parametrize("keys", ["random", "identical"])
def test_the_inverse_by_blocks_equals_elimination(C, block, keys):
    """``(I + A)^{-1}`` by blocks (diagonal blocks by elimination, then block substitution by
    matmuls) against the column-by-column elimination and against float64's inverse,
    including identical keys (A = beta on every pair: the inverse's entries alternate in sign
    and the elimination's intermediates are largest)."""
    from seqmix.kernels.delta_rule import chunk

    key = jax.random.key(C + block)
    k = jax.random.normal(key, (C, 16))
    if keys == "identical":
        k = jnp.ones((C, 16))
    k = k / jnp.linalg.norm(k, axis=1, keepdims=True)
    beta = jax.random.uniform(jax.random.key(1), (C, 1), jnp.float32, 0.9, 1.0)
    t, s = jnp.arange(C)[:, None], jnp.arange(C)[None, :]
    a = jnp.where(t > s, beta * (k @ k.T), 0.0)

    def dot32(x, y, trans_a=False, trans_b=False):
        return jnp.dot(x.T if trans_a else x, y.T if trans_b else y, precision="highest")

    blocked = chunk.unit_lower_inverse_blocked(a, dot32, block)
    plain = chunk.unit_lower_inverse(a)
    exact = np.linalg.inv(np.eye(C) + np.asarray(a, np.float64))
    scale = np.abs(exact).max()
    assert np.abs(np.asarray(blocked) - exact).max() < 1e-5 * scale
    assert np.abs(np.asarray(blocked) - np.asarray(plain)).max() < 1e-5 * scale
    assert np.allclose(np.triu(np.asarray(blocked), 1), 0.0)
