"""causal_conv1d: the lax.conv "xla" form against the tap-sum oracle."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqmix import testing
from seqmix.kernels import causal_conv1d, causal_conv1d_step


def _inputs(seed, B, T, C, W, dtype=jnp.float32):
    ks = jax.random.split(jax.random.key(seed), 4)
    x = jax.random.normal(ks[0], (B, T, C)).astype(dtype)
    w = jax.random.normal(ks[1], (W, C)).astype(dtype)
    b = jax.random.normal(ks[2], (C,)).astype(dtype)
    s0 = jax.random.normal(ks[3], (B, W - 1, C)).astype(dtype)
    return x, w, b, s0


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("W,T", [(2, 1), (4, 2), (4, 19), (8, 5)])
@pytest.mark.parametrize("activation", [None, "silu"])
def test_xla_matches_naive(W, T, activation, dtype):
    seed = testing.fresh_seed()
    x, w, b, s0 = _inputs(seed, 2, T, 6, W, dtype)
    f = lambda impl: (
        lambda x, w, b, s0: causal_conv1d(
            x,
            w,
            b,
            activation=activation,
            initial_state=s0,
            return_final_state=True,
            implementation=impl,
        )
    )
    testing.check_against(
        f("xla"),
        f("naive"),
        (x, w, b, s0),
        argnums=range(4),
        tol=testing.tolerance(dtype),
        seed=seed,
    )


def test_naive_matches_numpy():
    seed = testing.fresh_seed()
    x, w, b, _ = _inputs(seed, 1, 7, 3, 3)
    y = causal_conv1d(x, w, b, implementation="naive")
    xp = np.concatenate([np.zeros((2, 3)), np.asarray(x[0])])
    expected = np.stack(
        [np.asarray(b) + sum(np.asarray(w[j]) * xp[t + j] for j in range(3)) for t in range(7)]
    )
    np.testing.assert_allclose(y[0], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("W", [2, 4])
def test_two_pieces_and_steps_equal_whole(W):
    seed = testing.fresh_seed()
    x, w, b, _ = _inputs(seed, 2, 11, 5, W)
    y, state = causal_conv1d(x, w, b, activation="silu", return_final_state=True)
    y1, s1 = causal_conv1d(x[:, :1], w, b, activation="silu", return_final_state=True)
    y2, s2 = causal_conv1d(
        x[:, 1:], w, b, activation="silu", initial_state=s1, return_final_state=True
    )
    testing.assert_close(jnp.concatenate([y1, y2], 1), y, 1e-5)
    testing.assert_close(s2, state, 1e-6)
    s = jnp.zeros((2, W - 1, 5))
    outs = []
    for t in range(11):
        o, s = causal_conv1d_step(x[:, t], s, w, b, activation="silu")
        outs.append(o)
    testing.assert_close(jnp.stack(outs, 1), y, 1e-5)
    testing.assert_close(s, state, 1e-6)
