"""A NaN or Inf in k or v at a later position of a chunk or in another packed segment never
reaches an output of a chunked form, XLA or a Pallas kernel (interpret mode), as in the
recurrence; the rows it does reach (its own and the later ones of its segment) are not
finite (NaN in the chunked forms, the IEEE result in the recurrence), and neither is the
final state when the last segment holds one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqmix import testing
from seqmix.kernels import interpret, linear_attention

IMPLS = ["naive", "xla", "pallas_triton", "pallas_tpu", "pallas_mosaic_gpu"]


def _setting(impl):
    """(batch, key/value dim, dtype, chunk size, tolerance) that ``impl`` serves: Mosaic GPU
    takes bf16 and chunks of 64 only (one chunk here: the later rows of a chunk)."""
    if impl == "pallas_mosaic_gpu":
        return 1, 64, jnp.bfloat16, 64, 2e-2
    return 2, 8, jnp.float32, 16, 1e-5


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("decay", ["scalar", "channel"])
@pytest.mark.parametrize("segments", [False, True], ids=["one-sequence", "segments"])
def test_values_at_masked_positions_never_reach_an_output(impl, decay, segments):
    B, K, dtype, chunk, tol = _setting(impl)
    T, H, V = 40, 2, K
    ks = jax.random.split(jax.random.key(testing.fresh_seed()), 5)
    q = jax.random.normal(ks[0], (B, T, H, K), dtype)
    k = jax.random.normal(ks[1], (B, T, H, K), dtype)
    v = jax.random.normal(ks[2], (B, T, H, V), dtype)
    shape = (B, T, H) if decay == "scalar" else (B, T, H, K)
    g = jax.random.uniform(ks[3], shape, jnp.float32, -1.0, 0.0)
    s0 = jax.random.normal(ks[4], (B, H, K, V))
    seg = jnp.broadcast_to(jnp.array([0] * 10 + [1] * 15 + [2] * 15), (B, T)) if segments else None
    # NaN in a value at 13 (chunk 0 holds 0..15), Inf in a key at 20 (segment 1), head 0 only
    bad_v = v.at[:, 13, 0, 2].set(jnp.nan)
    bad_k = k.at[:, 20, 0, 5].set(jnp.inf)
    kw = dict(initial_state=s0, segment_ids=seg, return_final_state=True, implementation=impl)
    if impl != "naive":
        kw["chunk_size"] = chunk
    with interpret():
        run = jax.jit(lambda k, v: linear_attention(q, k, v, g, **kw))
        out, final = run(bad_k, bad_v)
        ref, ref_final = run(k, v)
    t = np.arange(T)
    if segments:  # 13 and 20 both fall in segment 1 (10..24)
        hit = (t >= 13) & (t < 25)
    else:
        hit = t >= 13
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    testing.assert_close(out[:, ~hit], ref[:, ~hit], tol, f"{impl}: rows the NaN cannot reach")
    testing.assert_close(out[:, :, 1], ref[:, :, 1], tol, f"{impl}: the other head")
    reached = ~np.all(np.isfinite(out[:, hit, 0]), axis=-1)
    assert np.all(reached), f"{impl}: rows a non-finite token reaches"
    final, ref_final = np.asarray(final), np.asarray(ref_final)
    if segments:
        testing.assert_close(final, ref_final, tol, f"{impl}: final state (last segment clean)")
    else:
        assert not np.all(np.isfinite(final[:, 0])), f"{impl}: final state of the NaN's head"
        testing.assert_close(final[:, 1], ref_final[:, 1], tol, f"{impl}: other head's state")


@pytest.mark.parametrize("impl", IMPLS[1:])
@pytest.mark.parametrize("segments", [False, True], ids=["one-sequence", "segments"])
def test_values_at_masked_positions_never_reach_a_gradient(impl, segments):
    """The chunked forms: the gradients of a loss on the rows a bad token cannot reach are
    those of clean inputs. (The recurrence gives NaN gradients at and after the bad token,
    0 times NaN in its backward scan; the rows before it stay finite there too.)"""
    _, K, dtype, chunk, tol = _setting(impl)
    B, T, H, V = 1, 40, 2, K
    ks = jax.random.split(jax.random.key(testing.fresh_seed()), 4)
    q = jax.random.normal(ks[0], (B, T, H, K), dtype)
    k = jax.random.normal(ks[1], (B, T, H, K), dtype)
    v = jax.random.normal(ks[2], (B, T, H, V), dtype)
    g = jax.random.uniform(ks[3], (B, T, H), jnp.float32, -1.0, 0.0)
    seg = jnp.broadcast_to(jnp.array([0] * 10 + [1] * 15 + [2] * 15), (B, T)) if segments else None
    bad_v = v.at[:, 13, 0, 2].set(jnp.nan)
    t = jnp.arange(T)
    clean = ~((t >= 13) & (t < 25)) if segments else t < 13

    def loss(q, k, v, g):
        o = linear_attention(q, k, v, g, segment_ids=seg, chunk_size=chunk, implementation=impl)
        return jnp.sum(jnp.where(clean[None, :, None, None], o.astype(jnp.float32), 0.0) ** 2)

    with interpret():
        grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))  # one compile for both
        grads, ref = grad(q, k, bad_v, g), grad(q, k, v, g)
    for name, d, r in zip(("q", "k", "v", "log_decay"), grads, ref):
        testing.assert_close(d, r, tol, f"{impl} d{name}")


@pytest.mark.parametrize("masked_gradients", [False, True], ids=["cond", "masked-gradients"])
@pytest.mark.parametrize("poisoned", [False, True], ids=["finite", "poisoned"])
def test_unless_poisoned_takes_the_masked_path_only_for_a_poisoned_final_state(
    poisoned, masked_gradients
):
    """The kernels' dispatch: the fast path's values and gradients where its final state is
    finite, the masked path's (``fast`` on the cleaned arguments) where it is not; with
    ``masked_gradients`` a differentiated call takes the masked path, which agrees with
    the fast one on clean arguments (here a stand-in ``clean`` that changes them, so that
    the two paths differ)."""
    from seqmix.kernels.linear_attention.reference import unless_poisoned

    def fast(x, s):  # o [B, T, H, V], final [B, H, K, V]
        return 2.0 * x, 1.0 * s

    def clean(x, s):  # a stand-in that changes x, so that the two paths differ
        return (1.5 * x, 0.0 * s), jnp.zeros(x.shape[:3], bool)

    x = jnp.arange(1.0, 5.0).reshape(1, 4, 1, 1)
    s = jnp.full((1, 1, 1, 1), jnp.inf if poisoned else 1.0)

    def loss(x, s):
        o, final = unless_poisoned(fast, clean, masked_gradients, x, s)
        return jnp.sum(o) + jnp.sum(jnp.where(jnp.isfinite(final), final, 0.0))

    assert float(jax.jit(loss)(x, s)) == (30.0 if poisoned else 21.0)
    value, (dx, ds) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(x, s)
    masked = poisoned or masked_gradients
    assert float(value) == (30.0 if masked else 21.0)
    assert np.unique(np.asarray(dx)).tolist() == [3.0 if masked else 2.0]
    assert float(ds.ravel()[0]) == (0.0 if masked else 1.0)


def test_the_fast_path_stays_a_cond_under_vmap_and_is_exact_for_every_member():
    """Under ``vmap`` (a batch of models, as the recall sweep trains them) the decision is
    one cond for the batch, not a select that runs both paths: a member with a bad token
    sends the batch down the masked path, which gives the clean members their own results
    (pallas_triton in interpret mode)."""
    B, T, H, K = 1, 32, 2, 8
    ks = jax.random.split(jax.random.key(testing.fresh_seed()), 4)
    q, k, v = (jax.random.normal(kk, (3, B, T, H, K)) for kk in ks[:3])
    g = jax.random.uniform(ks[3], (3, B, T, H), jnp.float32, -1.0, 0.0)
    v_bad = v.at[1, :, 20, 0, 1].set(jnp.nan)

    def op(q, k, v, g):
        return linear_attention(q, k, v, g, chunk_size=16, implementation="pallas_triton")

    with interpret():
        batched = jax.jit(jax.vmap(op))
        assert "cond[" in str(jax.make_jaxpr(jax.vmap(op))(q, k, v_bad, g))
        out, clean = np.asarray(batched(q, k, v_bad, g)), np.asarray(batched(q, k, v, g))
        one = np.asarray(jax.jit(op)(q[1], k[1], v_bad[1], g[1]))
    testing.assert_close(out[[0, 2]], clean[[0, 2]], 1e-5, "the clean members")
    np.testing.assert_array_equal(np.isfinite(out[1]), np.isfinite(one))
    testing.assert_close(out[1][:, :20], clean[1][:, :20], 1e-5, "rows before the bad token")


def test_mosaic_gpu_final_state_is_poisoned_by_a_bad_token():
    """The premise of the fast path for the Mosaic GPU engine (interpret mode): a NaN in v
    at any token of one sequence leaves the final state, as the kernels compute it on the
    inputs as given, non-finite."""
    from seqmix.kernels.linear_attention.mosaic_gpu import engine

    B, K, dtype, chunk, _ = _setting("pallas_mosaic_gpu")
    T, H = 128, 2
    ks = jax.random.split(jax.random.key(testing.fresh_seed()), 4)
    q, k, v = (jax.random.normal(kk, (B, T, H, K), dtype) for kk in ks[:3])
    g = jax.random.uniform(ks[3], (B, T, H), jnp.float32, -1.0, 0.0)
    for t in (5, 63, 127):
        bad_v = v.at[:, t, 1, 3].set(jnp.nan)
        with interpret():
            _, final = engine.linear_attention.__wrapped__(
                q, k, bad_v, g, scale=0.125, initial_state=None, runs=None, chunk_size=chunk
            )
        assert not np.all(np.isfinite(np.asarray(final[:, 1]))), f"NaN at {t}"
