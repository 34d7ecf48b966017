"""The linear-attention oracle and the XLA form: the oracle against a numpy loop, the
normaliser's definition, states carried across calls, segments as separate rows, the XLA
form's chunk groups, and no overflow at T = 4096."""

import jax.numpy as jnp
import numpy as np
import pytest

from seqmix import testing
from seqmix.kernels import linear_attention
from seqmix.kernels.linear_attention import reference

from .cases import Case, inputs


def _draw(seed, B, T, Hqk, Hv, K, V, decay, **kw):
    return inputs(Case("", B, T, Hqk, Hv, K, V, decay, 16, "float32", **kw), seed)


@pytest.mark.parametrize("decay", ["none", "scalar", "channel"])
def test_normalize_is_its_definition(decay):
    """o_t = q^T S_t / (q^T z_t + eps), z the same recurrence over k."""
    seed = testing.fresh_seed()
    q, k, v, g, _, _ = _draw(seed, 2, 37, 2, 2, 8, 8, decay, initial=False, normalize=True)
    o = linear_attention(q, k, v, g, normalize=True, chunk_size=16, implementation="naive")
    num = linear_attention(q, k, v, g, chunk_size=16, implementation="naive")
    den = linear_attention(
        q, k, jnp.ones_like(v[..., :1]), g, chunk_size=16, implementation="naive"
    )
    testing.assert_close(o, num / (den + 1e-6), 1e-5)


def test_long_sequence_float32_no_overflow():
    """T = 4096 in float32 with no decay: finite, within float32 tolerance."""
    seed = testing.fresh_seed()
    q, k, v, _, _, _ = _draw(seed, 1, 4096, 1, 1, 16, 16, "none", initial=False)
    o = linear_attention(q, k, v, implementation="xla")
    ref = linear_attention(q, k, v, implementation="naive")
    assert np.all(np.isfinite(o))
    testing.assert_close(o, ref, 1e-5)


@pytest.mark.parametrize("decay", ["scalar", "channel"])
def test_two_halves_with_state_equal_whole(decay):
    seed = testing.fresh_seed()
    q, k, v, g, s0, _ = _draw(seed, 2, 50, 1, 2, 8, 8, decay)
    whole, s_whole = linear_attention(q, k, v, g, initial_state=s0, return_final_state=True)
    a, s_a = linear_attention(
        q[:, :23], k[:, :23], v[:, :23], g[:, :23], initial_state=s0, return_final_state=True
    )
    b, s_b = linear_attention(
        q[:, 23:], k[:, 23:], v[:, 23:], g[:, 23:], initial_state=s_a, return_final_state=True
    )
    testing.assert_close(jnp.concatenate([a, b], axis=1), whole, 1e-5)
    testing.assert_close(s_b, s_whole, 1e-5)


def test_segments_reset_the_state():
    """A packed row equals its segments run separately (each from a zero state)."""
    seed = testing.fresh_seed()
    q, k, v, g, _, _ = _draw(seed, 1, 30, 1, 1, 8, 8, "scalar")
    seg = jnp.array([[0] * 11 + [1] * 12 + [2] * 7])
    packed = linear_attention(q, k, v, g, segment_ids=seg, chunk_size=8)
    pieces = [
        linear_attention(q[:, a:b], k[:, a:b], v[:, a:b], g[:, a:b], chunk_size=8)
        for a, b in [(0, 11), (11, 23), (23, 30)]
    ]
    testing.assert_close(packed, jnp.concatenate(pieces, axis=1), 1e-5)


def test_naive_matches_explicit_loop():
    """The oracle against numpy, for the scalar-decay grouped case."""
    seed = testing.fresh_seed()
    q, k, v, g, s0, _ = _draw(seed, 1, 6, 1, 2, 4, 3, "scalar")
    o = linear_attention(q, k, v, g, initial_state=s0, scale=0.7, implementation="naive")
    qn, kn, vn, gn = (np.asarray(x, np.float64) for x in (q, k, v, g))
    S = np.asarray(s0, np.float64)[0]
    for t in range(6):
        for h in range(2):
            S[h] = np.exp(gn[0, t, h]) * S[h] + np.outer(kn[0, t, 0], vn[0, t, h])
            np.testing.assert_allclose(o[0, t, h], 0.7 * qn[0, t, 0] @ S[h], rtol=2e-5, atol=1e-5)


def test_xla_per_channel_in_groups_of_chunks():
    """Stage 3 mapped over chunks in several groups gives the same result."""
    seed = testing.fresh_seed()
    q, k, v, g, s0, _ = _draw(seed, 1, 70, 1, 1, 8, 8, "channel")
    kw = dict(scale=0.5, initial_state=s0, runs=None, chunk_size=16)
    a = reference.linear_attention_xla(q, k, v, g, **kw)
    b = reference.linear_attention_xla(q, k, v, g, max_chunk_bytes=1, **kw)
    testing.assert_close(a[0], b[0], 1e-6)
