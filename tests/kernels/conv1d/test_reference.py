"""The convolution oracle against numpy, and a state carried across two calls."""

import jax.numpy as jnp
import numpy as np
import pytest

from seqmix import testing
from seqmix.kernels import causal_conv1d

from .cases import Case, inputs


def test_naive_matches_numpy():
    seed = testing.fresh_seed()
    x, w, b, _ = inputs(Case("", 1, 7, 3, 3, state=False), seed)
    y = causal_conv1d(x, w, b, implementation="naive")
    xp = np.concatenate([np.zeros((2, 3)), np.asarray(x[0])])
    expected = np.stack(
        [np.asarray(b) + sum(np.asarray(w[j]) * xp[t + j] for j in range(3)) for t in range(7)]
    )
    np.testing.assert_allclose(y[0], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("W", [2, 4])
def test_two_pieces_equal_whole(W):
    seed = testing.fresh_seed()
    x, w, b, _ = inputs(Case("", 2, 11, 5, W, state=False), seed)
    y, state = causal_conv1d(x, w, b, activation="silu", return_final_state=True)
    y1, s1 = causal_conv1d(x[:, :1], w, b, activation="silu", return_final_state=True)
    y2, s2 = causal_conv1d(
        x[:, 1:], w, b, activation="silu", initial_state=s1, return_final_state=True
    )
    testing.assert_close(jnp.concatenate([y1, y2], 1), y, 1e-5)
    testing.assert_close(s2, state, 1e-6)
