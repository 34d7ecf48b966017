"""The selective-scan oracle against a numpy loop, and a state carried across two calls."""

import jax.numpy as jnp
import numpy as np

from seqmix import testing
from seqmix.kernels import selective_scan

from .cases import Case, inputs


def test_naive_matches_numpy():
    seed = testing.fresh_seed()
    u, delta, A, Bm, C, D, z, bias, h0 = inputs(Case("", 1, 5, 4, 3, 2), seed)
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
    u, delta, A, Bm, C, D, z, bias, _ = inputs(Case("", 2, 20, 8, 4, 1), seed)
    kw = dict(delta_bias=bias, delta_softplus=True, return_final_state=True)
    y, h = selective_scan(u, delta, A, Bm, C, D, z, **kw)
    y1, h1 = selective_scan(u[:, :7], delta[:, :7], A, Bm[:, :7], C[:, :7], D, z[:, :7], **kw)
    y2, h2 = selective_scan(
        u[:, 7:], delta[:, 7:], A, Bm[:, 7:], C[:, 7:], D, z[:, 7:], initial_state=h1, **kw
    )
    testing.assert_close(jnp.concatenate([y1, y2], 1), y, 1e-5)
    testing.assert_close(h2, h, 1e-5)
