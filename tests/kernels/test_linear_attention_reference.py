"""linear_attention: the chunked "xla" form against the token-by-token "naive" oracle."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqmix import testing
from seqmix.kernels import linear_attention, linear_attention_step
from seqmix.kernels.linear_attention import reference


def _inputs(seed, B, T, Hqk, Hv, K, V, decay, dtype=jnp.float32, g_min=-1.0):
    ks = jax.random.split(jax.random.key(seed), 5)
    q = jax.random.normal(ks[0], (B, T, Hqk, K), jnp.float32).astype(dtype)
    k = jax.random.normal(ks[1], (B, T, Hqk, K), jnp.float32).astype(dtype)
    v = jax.random.normal(ks[2], (B, T, Hv, V), jnp.float32).astype(dtype)
    g = None
    if decay == "scalar":
        g = jax.random.uniform(ks[3], (B, T, Hv), jnp.float32, g_min, 0.0)
    elif decay == "channel":
        g = jax.random.uniform(ks[3], (B, T, Hv, K), jnp.float32, g_min, 0.0)
    s0 = jax.random.normal(ks[4], (B, Hv, K, V), jnp.float32)
    return q, k, v, g, s0


def _segments(seed, B, T):
    return jnp.sort(jax.random.randint(jax.random.key(seed + 7), (B, T), 0, 3), axis=1)


CASES = [
    # B, T, Hqk, Hv, K, V, decay, chunk
    (2, 1, 2, 2, 8, 8, "scalar", 16),
    (2, 15, 1, 2, 8, 16, "none", 16),
    (1, 16, 2, 4, 16, 8, "scalar", 16),
    (2, 17, 2, 2, 8, 8, "channel", 16),
    (1, 63, 1, 3, 8, 8, "scalar", 64),
    (1, 65, 2, 2, 8, 8, "channel", 64),
]


@pytest.mark.parametrize("segments", [False, True])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_xla_matches_naive_with_states(case, segments):
    B, T, Hqk, Hv, K, V, decay, chunk = case
    seed = testing.fresh_seed()
    q, k, v, g, s0 = _inputs(seed, B, T, Hqk, Hv, K, V, decay)
    seg = _segments(seed, B, T) if segments else None
    args = (q, k, v, s0) if g is None else (q, k, v, s0, g)

    def run(impl):
        def f(q, k, v, s0, g=None):
            return linear_attention(
                q,
                k,
                v,
                g,
                initial_state=s0,
                return_final_state=True,
                segment_ids=seg,
                chunk_size=chunk,
                implementation=impl,
            )

        return f

    testing.check_against(
        run("xla"),
        run("naive"),
        args,
        argnums=range(len(args)),
        tol=1e-5,
        seed=seed,
        names=["q", "k", "v", "initial_state", "log_decay"],
    )


@pytest.mark.parametrize("decay", ["none", "scalar", "channel"])
def test_normalize(decay):
    seed = testing.fresh_seed()
    q, k, v, g, _ = _inputs(seed, 2, 37, 2, 2, 8, 8, decay)
    # positive features, as a linear-attention feature map would give
    q, k = jax.nn.elu(q) + 1, jax.nn.elu(k) + 1

    def run(impl):
        return lambda q, k, v: linear_attention(
            q, k, v, g, normalize=True, chunk_size=16, implementation=impl
        )

    testing.check_against(
        run("xla"), run("naive"), (q, k, v), argnums=(0, 1, 2), tol=1e-5, seed=seed
    )
    # and the definition: o_t = q^T S_t / (q^T z_t + eps)
    o = run("naive")(q, k, v)
    num = linear_attention(q, k, v, g, chunk_size=16, implementation="naive")
    den = linear_attention(
        q, k, jnp.ones_like(v[..., :1]), g, chunk_size=16, implementation="naive"
    )
    testing.assert_close(o, num / (den + 1e-6), 1e-5)


def test_strong_decay_bf16_and_long_sequence():
    seed = testing.fresh_seed()
    # log decay down to -20, bf16 inputs
    q, k, v, g, s0 = _inputs(seed, 1, 130, 2, 2, 16, 16, "channel", jnp.bfloat16, g_min=-20.0)
    f = lambda impl: (
        lambda q, k, v, g: linear_attention(
            q, k, v, g, initial_state=s0, return_final_state=True, implementation=impl
        )
    )
    testing.check_against(
        f("xla"), f("naive"), (q, k, v, g), argnums=(0, 1, 2, 3), tol=5e-3, seed=seed
    )
    # T = 4096 in float32 with no decay: no overflow, still within float32 tolerance
    q, k, v, _, _ = _inputs(seed, 1, 4096, 1, 1, 16, 16, "none")
    o = linear_attention(q, k, v, implementation="xla")
    ref = linear_attention(q, k, v, implementation="naive")
    assert np.all(np.isfinite(o))
    testing.assert_close(o, ref, 1e-5)


@pytest.mark.parametrize("decay", ["scalar", "channel"])
def test_two_halves_with_state_equal_whole(decay):
    seed = testing.fresh_seed()
    q, k, v, g, s0 = _inputs(seed, 2, 50, 1, 2, 8, 8, decay)
    whole, s_whole = linear_attention(q, k, v, g, initial_state=s0, return_final_state=True)
    a, s_a = linear_attention(
        q[:, :23], k[:, :23], v[:, :23], g[:, :23], initial_state=s0, return_final_state=True
    )
    b, s_b = linear_attention(
        q[:, 23:], k[:, 23:], v[:, 23:], g[:, 23:], initial_state=s_a, return_final_state=True
    )
    testing.assert_close(jnp.concatenate([a, b], axis=1), whole, 1e-5)
    testing.assert_close(s_b, s_whole, 1e-5)


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("decay", ["none", "scalar", "channel"])
def test_step_repeated_equals_full(decay, normalize):
    seed = testing.fresh_seed()
    B, T, Hqk, Hv, K, V = 2, 9, 1, 2, 8, 4
    q, k, v, g, _ = _inputs(seed, B, T, Hqk, Hv, K, V, decay)
    if normalize:
        q, k = jax.nn.elu(q) + 1, jax.nn.elu(k) + 1
    full, final = linear_attention(q, k, v, g, normalize=normalize, return_final_state=True)
    state = jnp.zeros((B, Hv, K, V + 1 if normalize else V), jnp.float32)
    outs = []
    for t in range(T):
        o, state = linear_attention_step(
            q[:, t], k[:, t], v[:, t], state, None if g is None else g[:, t], normalize=normalize
        )
        outs.append(o)
    testing.assert_close(jnp.stack(outs, 1), full, 1e-5)
    testing.assert_close(state, final, 1e-5)


def test_segments_reset_the_state():
    """A packed row equals its segments run separately (each from a zero state)."""
    seed = testing.fresh_seed()
    q, k, v, g, _ = _inputs(seed, 1, 30, 1, 1, 8, 8, "scalar")
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
    q, k, v, g, s0 = _inputs(seed, 1, 6, 1, 2, 4, 3, "scalar")
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
    q, k, v, g, s0 = _inputs(seed, 1, 70, 1, 1, 8, 8, "channel")
    kw = dict(scale=0.5, initial_state=s0, runs=None, chunk_size=16)
    a = reference.linear_attention_xla(q, k, v, g, **kw)
    b = reference.linear_attention_xla(q, k, v, g, max_chunk_bytes=1, **kw)
    testing.assert_close(a[0], b[0], 1e-6)
