"""Every registered mixer: builds, forward and backward, decoding equals the full forward,
causality, packed segments. Tiny shapes, float32, default (auto) implementations.

Each (case, causal) mixer is built once and its calls are jitted (``Runner``), so that a
shape compiles once for all the tests that use it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from seqmix.models import MIXERS, build_mixer
from seqmix.testing import assert_close, fresh_seed

from .cases import CASES, D_MODEL, IDS, config_for

TOL = 1e-4  # float32 relative error: chunked vs step vs dense paths
B, T = 2, 10


class Runner:
    """A mixer and jitted pure functions of its parameters."""

    def __init__(self, mixer):
        self.mixer = mixer
        self.graphdef, self.params = nnx.split(mixer)
        graphdef = self.graphdef

        def apply(params, x, segment_ids):
            return nnx.merge(graphdef, params)(x, segment_ids=segment_ids)

        def decode(params, x, cache):
            return nnx.merge(graphdef, params)(x, cache=cache)

        def loss(params, x):
            return jnp.mean(jnp.square(apply(params, x, None)))

        self._apply = jax.jit(apply)
        self._decode = jax.jit(decode)
        self.grad = jax.jit(jax.grad(loss, argnums=(0, 1)))

    def __call__(self, x, segment_ids=None):
        return self._apply(self.params, x, segment_ids)

    def decode(self, x, cache):
        return self._decode(self.params, x, cache)


@functools.cache
def runner(case_id: str, causal: bool) -> Runner:
    _, name, overrides = CASES[IDS.index(case_id)]
    return Runner(build_mixer(name, config_for(name, overrides), causal=causal, rngs=nnx.Rngs(0)))


def inputs(seed, length=T, batch=B):
    return jax.random.normal(jax.random.key(seed), (batch, length, D_MODEL), jnp.float32)


def test_every_registered_mixer_has_a_case():
    assert {name for _, name, _ in CASES} == set(MIXERS)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("case_id", IDS)
def test_forward_backward_finite(case_id, causal):
    run = runner(case_id, causal)
    x = inputs(fresh_seed())
    y = run(x)
    assert y.shape == x.shape and y.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(y)))
    g_params, g_x = run.grad(run.params, x)
    assert np.all(np.isfinite(np.asarray(g_x))) and np.any(np.asarray(g_x) != 0)
    for path, g in jax.tree_util.tree_leaves_with_path(g_params):
        g = np.asarray(g)
        assert np.all(np.isfinite(g)), f"non-finite gradient at {jax.tree_util.keystr(path)}"
        assert np.any(g != 0), f"zero gradient at {jax.tree_util.keystr(path)} (unused?)"


@pytest.mark.parametrize("case_id", IDS)
def test_decoding_equals_forward(case_id):
    """Token by token, and prefill + a multi-token chunk + steps, equal the full forward."""
    run = runner(case_id, True)
    x = inputs(fresh_seed())
    full = run(x)

    cache = run.mixer.init_cache(B, T)
    steps = []
    for t in range(T):
        y, cache = run.decode(x[:, t : t + 1], cache)
        steps.append(y)
    assert_close(jnp.concatenate(steps, axis=1), full, TOL, "token by token")

    cache = run.mixer.init_cache(B, T)
    parts = []
    for lo, hi in ((0, 3), (3, 6), (6, 9), (9, 10)):
        y, cache = run.decode(x[:, lo:hi], cache)
        parts.append(y)
    assert_close(jnp.concatenate(parts, axis=1), full, TOL, "prefill, a chunk, then steps")


@pytest.mark.parametrize("case_id", IDS)
def test_causal(case_id):
    run = runner(case_id, True)
    seed = fresh_seed()
    x = inputs(seed)
    t = 4
    x2 = x.at[:, t + 1 :].set(inputs(seed + 1)[:, t + 1 :])
    y, y2 = run(x), run(x2)
    np.testing.assert_array_equal(np.asarray(y[:, : t + 1]), np.asarray(y2[:, : t + 1]))
    assert not np.allclose(np.asarray(y[:, t + 1 :]), np.asarray(y2[:, t + 1 :]))


@pytest.mark.parametrize("case_id", IDS)
def test_segments_reset_causal(case_id):
    """In a packed row [a | b] (segment ids), a causal mixer gives b exactly the output b
    has alone (its state, conv taps and positions restart). Row 0 splits at 4, row 1 at 6;
    b alone is the start of an unpacked row [b | a]."""
    run = runner(case_id, True)
    x = inputs(fresh_seed())
    splits = (4, 6)
    segment_ids = jnp.stack([(jnp.arange(T) >= s).astype(jnp.int32) + 3 for s in splits])
    packed = run(x, segment_ids)
    rolled = run(jnp.stack([jnp.roll(x[r], -s, axis=0) for r, s in enumerate(splits)]))
    plain = run(x)
    for r, s in enumerate(splits):
        assert_close(packed[r, :s], plain[r, :s], TOL, f"row {r}, first segment")
        assert_close(packed[r, s:], rolled[r, : T - s], TOL, f"row {r}, second segment alone")


@pytest.mark.parametrize("case_id", IDS)
def test_segments_isolate_bidirectional(case_id):
    """In the bidirectional form, changing one packed sequence changes only its own
    outputs, in both directions."""
    run = runner(case_id, False)
    seed = fresh_seed()
    x, other = inputs(seed), inputs(seed + 1)
    s = 4
    segment_ids = jnp.broadcast_to((jnp.arange(T) >= s).astype(jnp.int32), (B, T))
    y = run(x, segment_ids)
    y_a = run(x.at[:, :s].set(other[:, :s]), segment_ids)  # first sequence changed
    y_b = run(x.at[:, s:].set(other[:, s:]), segment_ids)  # second sequence changed
    assert_close(y_a[:, s:], y[:, s:], TOL, "second sequence when the first changes")
    assert_close(y_b[:, :s], y[:, :s], TOL, "first sequence when the second changes")
    assert not np.allclose(np.asarray(y_a[:, :s]), np.asarray(y[:, :s]))
    assert not np.allclose(np.asarray(y_b[:, s:]), np.asarray(y[:, s:]))
