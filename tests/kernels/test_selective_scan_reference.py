"""selective_scan: the associative-scan "xla" form against the token-by-token oracle."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqmix import testing
from seqmix.kernels import selective_scan


def _inputs(seed, B, T, Dm, N, G, dtype=jnp.float32, strong=False):
    ks = jax.random.split(jax.random.key(seed), 9)
    u = jax.random.normal(ks[0], (B, T, Dm)).astype(dtype)
    delta = (jax.random.normal(ks[1], (B, T, Dm)) * 0.5).astype(dtype)
    A = -jnp.exp(jax.random.normal(ks[2], (Dm, N)) * 0.5) * (30.0 if strong else 1.0)
    shape = (B, T, N) if G is None else (B, T, G, N)
    Bm = jax.random.normal(ks[3], shape).astype(dtype)
    C = jax.random.normal(ks[4], shape).astype(dtype)
    D = jax.random.normal(ks[5], (Dm,))
    z = jax.random.normal(ks[6], (B, T, Dm)).astype(dtype)
    bias = jax.random.normal(ks[7], (Dm,)) * 0.1
    h0 = jax.random.normal(ks[8], (B, Dm, N))
    return u, delta, A, Bm, C, D, z, bias, h0


@pytest.mark.parametrize("T", [1, 17])
@pytest.mark.parametrize("G", [None, 1, 2])
@pytest.mark.parametrize("gated", [False, True])
def test_xla_matches_naive(T, G, gated):
    seed = testing.fresh_seed()
    u, delta, A, Bm, C, D, z, bias, h0 = _inputs(seed, 2, T, 8, 4, G)

    def run(impl):
        def f(u, delta, A, Bm, C, D, z, bias, h0):
            return selective_scan(
                u,
                delta,
                A,
                Bm,
                C,
                D,
                z if gated else None,
                delta_bias=bias,
                delta_softplus=True,
                initial_state=h0,
                return_final_state=True,
                implementation=impl,
            )

        return f

    args = (u, delta, A, Bm, C, D, z, bias, h0)
    testing.check_against(
        run("xla"),
        run("naive"),
        args,
        argnums=range(9),
        tol=1e-5,
        seed=seed,
        names=["u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state"],
    )


def test_bf16_strong_decay_no_skip():
    seed = testing.fresh_seed()
    u, delta, A, Bm, C, _, _, _, _ = _inputs(seed, 2, 33, 8, 4, 2, jnp.bfloat16, strong=True)
    f = lambda impl: (
        lambda u, delta, A, Bm, C: selective_scan(
            u, delta, A, Bm, C, delta_softplus=True, implementation=impl
        )
    )
    testing.check_against(
        f("xla"), f("naive"), (u, delta, A, Bm, C), argnums=range(5), tol=5e-3, seed=seed
    )


def test_naive_matches_numpy():
    seed = testing.fresh_seed()
    u, delta, A, Bm, C, D, z, bias, h0 = _inputs(seed, 1, 5, 4, 3, 2)
    y = selective_scan(
        u,
        delta,
        A,
        Bm,
        C,
        D,
        z,
        delta_bias=bias,
        delta_softplus=True,
        initial_state=h0,
        implementation="naive",
    )
    un, dn, An, Bn, Cn, Dn, zn, bn = (
        np.asarray(x, np.float64) for x in (u, delta, A, Bm, C, D, z, bias)
    )
    h = np.asarray(h0, np.float64)[0]
    for t in range(5):
        dt = np.log1p(np.exp(dn[0, t] + bn))
        for d in range(4):
            g = d // 2
            h[d] = np.exp(dt[d] * An[d]) * h[d] + dt[d] * Bn[0, t, g] * un[0, t, d]
            yd = Cn[0, t, g] @ h[d] + Dn[d] * un[0, t, d]
            yd *= zn[0, t, d] / (1 + np.exp(-zn[0, t, d]))
            np.testing.assert_allclose(y[0, t, d], yd, rtol=1e-4, atol=1e-5)


def test_two_pieces_with_state_equal_whole():
    seed = testing.fresh_seed()
    u, delta, A, Bm, C, D, z, bias, _ = _inputs(seed, 2, 20, 8, 4, 1)
    kw = dict(delta_bias=bias, delta_softplus=True, return_final_state=True)
    y, h = selective_scan(u, delta, A, Bm, C, D, z, **kw)
    y1, h1 = selective_scan(u[:, :7], delta[:, :7], A, Bm[:, :7], C[:, :7], D, z[:, :7], **kw)
    y2, h2 = selective_scan(
        u[:, 7:], delta[:, 7:], A, Bm[:, 7:], C[:, 7:], D, z[:, 7:], initial_state=h1, **kw
    )
    testing.assert_close(jnp.concatenate([y1, y2], 1), y, 1e-5)
    testing.assert_close(h2, h, 1e-5)
