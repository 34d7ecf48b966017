"""A NaN or Inf in v at a key that is masked out (a future position, another packed
segment, outside the window) never reaches an output, in every CPU implementation; a row
that attends such a key is NaN. The kernels pay for it only in the tiles that need a mask."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqmix import testing
from seqmix.kernels import attention, interpret
from seqmix.kernels.attention.reference import visible

IMPLS = ["naive", "xla", "pallas_triton", "pallas_tpu"]
MASKS = {
    "causal": dict(causal=True),
    "causal-window-5": dict(causal=True, local_window_size=(5, 0)),
    "segments": dict(segments=True),
    "causal-segments": dict(causal=True, segments=True),
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mask", list(MASKS))
def test_values_at_masked_keys_never_reach_an_output(impl, mask):
    kw = dict(MASKS[mask])
    B, T, H, Hkv, D = 2, 40, 2, 1, 16
    ks = jax.random.split(jax.random.key(testing.fresh_seed()), 3)
    q = jax.random.normal(ks[0], (B, T, H, D))
    k = jax.random.normal(ks[1], (B, T, Hkv, D))
    v = jax.random.normal(ks[2], (B, T, Hkv, D))
    seg = None
    if kw.pop("segments", False):
        # the bad keys fall in segments 0 and 2: the rows of segment 1 attend none
        seg = jnp.broadcast_to(jnp.array([0] * 10 + [1] * 5 + [2] * 25), (B, T))
        kw["segment_ids"] = seg
    # non-finite values (whole rows and single elements) at keys 7, 23 and 31 of each row
    bad_v = v.at[:, 7].set(jnp.nan).at[:, 23, :, 3].set(jnp.inf).at[:, 31, :, 0].set(-jnp.inf)
    with interpret():
        out = attention(q, k, bad_v, implementation=impl, **kw)
    ref = attention(q, k, v, implementation="naive", **kw)
    window = kw.get("local_window_size")
    window = (None, None) if window is None else window
    sees = visible(
        jnp.arange(T),
        jnp.arange(T),
        causal=kw.get("causal", False),
        window=window,
        q_segment_ids=seg,
        k_segment_ids=seg,
    )
    sees = jnp.broadcast_to(sees, (B, T, T))
    hit = np.asarray(jnp.any(sees[:, :, jnp.array([7, 23, 31])], axis=-1))  # [B, T]
    out, ref = np.asarray(out), np.asarray(ref)
    assert hit.any() and (~hit).any()
    testing.assert_close(out[~hit], ref[~hit], 1e-5, f"{impl} rows that attend no bad key")
    assert np.all(np.isnan(out[hit])), f"{impl}: a row that attends a non-finite value"


@pytest.mark.parametrize("impl", ["naive", "xla", "pallas_triton", "pallas_tpu"])
@pytest.mark.parametrize("mask", list(MASKS))
def test_values_at_masked_keys_never_reach_a_gradient(impl, mask):
    """The gradients of a loss on the rows that attend no bad key are those of clean inputs
    (finite): neither the bad values nor the NaN rows reach dq, dk or dv."""
    kw = dict(MASKS[mask])
    B, T, H, Hkv, D = 1, 40, 2, 1, 8
    ks = jax.random.split(jax.random.key(testing.fresh_seed()), 3)
    q = jax.random.normal(ks[0], (B, T, H, D))
    k = jax.random.normal(ks[1], (B, T, Hkv, D))
    v = jax.random.normal(ks[2], (B, T, Hkv, D))
    seg = None
    if kw.pop("segments", False):
        seg = jnp.broadcast_to(jnp.array([0] * 10 + [1] * 5 + [2] * 25), (B, T))
        kw["segment_ids"] = seg
    bad_v = v.at[:, 7].set(jnp.nan).at[:, 23, :, 3].set(jnp.inf)
    window = kw.get("local_window_size")
    sees = visible(
        jnp.arange(T),
        jnp.arange(T),
        causal=kw.get("causal", False),
        window=(None, None) if window is None else window,
        q_segment_ids=seg,
        k_segment_ids=seg,
    )
    sees = jnp.broadcast_to(sees, (B, T, T))
    clean_rows = ~jnp.any(sees[:, :, jnp.array([7, 23])], axis=-1)  # [B, T]

    def loss(q, k, v):
        o = attention(q, k, v, implementation=impl, **kw)
        return jnp.sum(jnp.where(clean_rows[..., None, None], o, 0.0) ** 2)

    with interpret():
        grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, bad_v)
        ref = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
    for name, g, r in zip("qkv", grads, ref):
        testing.assert_close(g, r, 1e-5, f"{impl} d{name}")
