"""A NaN or Inf in k, v or (under jit) beta at a later position of a chunk or in another packed segment
never reaches an output of a chunked form, XLA or a Pallas kernel (interpret mode), as in
the recurrence; the rows it does
reach (its own and the later ones of its segment) are not finite, and neither is the final
state when the last segment holds one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqmix import testing
from seqmix.kernels import gated_delta_rule, interpret

IMPLS = ["naive", "xla", "pallas_triton", "pallas_tpu"]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("segments", [False, True], ids=["one-sequence", "segments"])
def test_values_at_masked_positions_never_reach_an_output(impl, segments):
    B, T, H, K, V = 2, 40, 2, 8, 8
    ks = jax.random.split(jax.random.key(testing.fresh_seed()), 6)
    q = jax.random.normal(ks[0], (B, T, H, K))
    k = jax.random.normal(ks[1], (B, T, H, K))
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    v = jax.random.normal(ks[2], (B, T, H, V))
    beta = jax.random.uniform(ks[3], (B, T, H))
    g = jax.random.uniform(ks[4], (B, T, H), jnp.float32, -1.0, 0.0)
    s0 = jax.random.normal(ks[5], (B, H, K, V))
    seg = jnp.broadcast_to(jnp.array([0] * 10 + [1] * 15 + [2] * 15), (B, T)) if segments else None
    # head 0 only: NaN in a value at 13 (chunk 0 holds 0..15), Inf in a key at 20
    # (segment 1), NaN in beta at 33 (segment 2)
    bad_v = v.at[:, 13, 0, 2].set(jnp.nan)
    bad_k = k.at[:, 20, 0, 5].set(jnp.inf)
    bad_beta = beta.at[:, 33, 0].set(jnp.nan)
    kw = dict(initial_state=s0, segment_ids=seg, return_final_state=True, implementation=impl)
    if impl != "naive":
        kw["chunk_size"] = 16
    # under jit, where beta's values are not known to the argument check (which refuses a
    # concrete NaN beta with a ValueError)
    with interpret():
        run = jax.jit(lambda k, v, beta: gated_delta_rule(q, k, v, beta, g, **kw))
        out, final = run(bad_k, bad_v, bad_beta)
        ref, ref_final = run(k, v, beta)
    t = np.arange(T)
    if segments:  # 13 and 20 fall in segment 1 (10..24), 33 in segment 2 (25..39)
        hit = (t >= 13) & (t < 25) | (t >= 33)
    else:
        hit = t >= 13
    out, ref = np.asarray(out), np.asarray(ref)
    testing.assert_close(out[:, ~hit], ref[:, ~hit], 1e-5, f"{impl}: rows the NaN cannot reach")
    testing.assert_close(out[:, :, 1], ref[:, :, 1], 1e-5, f"{impl}: the other head")
    reached = ~np.all(np.isfinite(out[:, hit, 0]), axis=-1)
    assert np.all(reached), f"{impl}: rows a non-finite token reaches"
    final, ref_final = np.asarray(final), np.asarray(ref_final)
    assert not np.all(np.isfinite(final[:, 0])), f"{impl}: final state of the NaN's head"
    testing.assert_close(final[:, 1], ref_final[:, 1], 1e-5, f"{impl}: other head's state")


@pytest.mark.parametrize("impl", IMPLS[1:])
@pytest.mark.parametrize("segments", [False, True], ids=["one-sequence", "segments"])
def test_values_at_masked_positions_never_reach_a_gradient(impl, segments):
    """The chunked forms: the gradients of a loss on the rows a bad token cannot reach are those of clean
    inputs."""
    B, T, H, K, V = 1, 40, 2, 8, 8
    ks = jax.random.split(jax.random.key(testing.fresh_seed()), 5)
    q = jax.random.normal(ks[0], (B, T, H, K))
    k = jax.random.normal(ks[1], (B, T, H, K))
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    v = jax.random.normal(ks[2], (B, T, H, V))
    beta = jax.random.uniform(ks[3], (B, T, H))
    g = jax.random.uniform(ks[4], (B, T, H), jnp.float32, -1.0, 0.0)
    seg = jnp.broadcast_to(jnp.array([0] * 10 + [1] * 15 + [2] * 15), (B, T)) if segments else None
    bad_v = v.at[:, 13, 0, 2].set(jnp.nan)
    t = jnp.arange(T)
    clean = ~((t >= 13) & (t < 25)) if segments else t < 13

    def loss(q, k, v, beta, g):
        o = gated_delta_rule(q, k, v, beta, g, segment_ids=seg, chunk_size=16, implementation=impl)
        return jnp.sum(jnp.where(clean[None, :, None, None], o, 0.0) ** 2)

    with interpret():
        grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))  # one compile for both
        grads, ref = grad(q, k, bad_v, beta, g), grad(q, k, v, beta, g)
    for name, d, r in zip(("q", "k", "v", "beta", "log_decay"), grads, ref):
        testing.assert_close(d, r, 1e-5, f"{impl} d{name}")
