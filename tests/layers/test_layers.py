"""The modules around the mixers, config errors, and Linen interop."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from seqmix import kernels
from seqmix.layers import (
    MLP,
    Attention,
    GatedRMSNorm,
    LinearAttention,
    Mamba2,
    RMSNorm,
    ShortConv,
    as_linen,
    mixer_config,
)
from seqmix.layers.linear_attention import apply_feature_map, feature_dim, retnet_log_decay
from seqmix.layers.rotary import apply_rotary
from seqmix.testing import assert_close, fresh_seed

TOL = 1e-5


def normal(seed, shape):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def test_rmsnorm_unit_rms():
    x = normal(fresh_seed(), (3, 5, 16)) * 7.0
    y = RMSNorm(16, eps=0.0, rngs=nnx.Rngs(0))(x)
    np.testing.assert_allclose(np.sqrt(np.mean(np.square(np.asarray(y)), -1)), 1.0, rtol=1e-5)


def test_gated_rmsnorm_normalises_each_group():
    seed = fresh_seed()
    y, z = normal(seed, (2, 3, 12)), normal(seed + 1, (2, 3, 12))
    out = GatedRMSNorm(12, groups=3, eps=0.0, rngs=nnx.Rngs(0))(y, z)
    h = np.asarray(y * jax.nn.silu(z)).reshape(2, 3, 3, 4)
    want = h / np.sqrt(np.mean(h**2, axis=-1, keepdims=True))
    assert_close(out, want.reshape(2, 3, 12), TOL)


@pytest.mark.parametrize("mlp_type", ["swiglu", "gelu"])
def test_mlp(mlp_type):
    mlp = MLP(16, mlp_type=mlp_type, expansion=3.0, rngs=nnx.Rngs(0))
    assert mlp.hidden == (32 if mlp_type == "swiglu" else 48)
    x = normal(fresh_seed(), (2, 4, 16))
    up, down = mlp.up.kernel[...], mlp.down.kernel[...]
    if mlp_type == "swiglu":
        want = (jax.nn.silu(x @ mlp.gate.kernel[...]) * (x @ up)) @ down
    else:
        want = jax.nn.gelu(x @ up) @ down
    assert_close(mlp(x), want, TOL)


def test_rotary_depends_on_relative_position():
    seed = fresh_seed()
    q, k = normal(seed, (1, 6, 2, 8)), normal(seed + 1, (1, 6, 2, 8))
    pos = jnp.arange(6)[None]

    def scores(offset):
        qr = apply_rotary(q, pos + offset)
        kr = apply_rotary(k, pos + offset)
        return jnp.einsum("bthd,bshd->bhts", qr, kr)

    assert_close(scores(0), scores(11), 1e-5)
    assert_close(apply_rotary(q, jnp.zeros((1, 6), jnp.int32)), q, 1e-7)


@pytest.mark.parametrize(
    "name, size",
    [("taylor", lambda d: 1 + d + d * d), ("taylor_symmetric", lambda d: 1 + d + d * (d + 1) // 2)],
)
def test_taylor_feature_maps_are_second_order_exp(name, size):
    """Both Taylor maps give the kernel ``1 + s + s^2 / 2`` of ``s = q.k / sqrt(d)``; the
    symmetric one from ``d (d + 1) / 2`` products (15 features at d = 4, not 21)."""
    seed = fresh_seed()
    d = 4
    q, k = normal(seed, (5, d)), normal(seed + 1, (5, d))
    s = jnp.sum(q * k, -1) / np.sqrt(d)
    got = jnp.sum(apply_feature_map(q, name) * apply_feature_map(k, name), -1)
    assert apply_feature_map(q, name).shape == (5, size(d)) == (5, feature_dim(name, d))
    assert_close(got, 1 + s + s**2 / 2, 1e-5)


def test_retnet_decays():
    np.testing.assert_allclose(
        np.exp(np.asarray(retnet_log_decay(3))), [1 - 2**-5, 1 - 2**-6, 1 - 2**-7], rtol=1e-6
    )


def test_short_conv_restarts_at_segment_starts():
    conv = ShortConv(6, 4, rngs=nnx.Rngs(0))
    x = normal(fresh_seed(), (1, 9, 6))
    seg = jnp.array([[0, 0, 1, 1, 1, 1, 1, 2, 2]])
    y = conv(x, segment_ids=seg)
    w, b = conv.weight[...], conv.bias[...]
    for lo, hi in ((0, 2), (2, 7), (7, 9)):
        alone = kernels.causal_conv1d(x[:, lo:hi], w, b, activation="silu")
        assert_close(y[:, lo:hi], alone, TOL, f"segment [{lo}, {hi})")


def test_errors_name_the_keys():
    with pytest.raises(ValueError, match=r"d_model \(30\).*num_heads \(4\)"):
        Attention(mixer_config(Attention, d_model=30, num_heads=4), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"num_heads \(4\).*num_kv_heads \(3\)"):
        Attention(
            mixer_config(Attention, d_model=32, num_heads=4, num_kv_heads=3), rngs=nnx.Rngs(0)
        )
    with pytest.raises(ValueError, match=r"d_model \(30\).*num_heads \(4\)"):
        LinearAttention(mixer_config(LinearAttention, d_model=30), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="headdim"):
        Mamba2(mixer_config(Mamba2, d_model=32, headdim=48), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="ngroups"):
        Mamba2(mixer_config(Mamba2, d_model=32, headdim=16, ngroups=3), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="feature_map"):
        LinearAttention(
            mixer_config(LinearAttention, d_model=32, feature_map="softmax"), rngs=nnx.Rngs(0)
        )
    with pytest.raises(ValueError, match="unknown keys"):
        mixer_config(Attention, d_model=32, num_head=4)


def test_mixer_rejects_cache_with_segments_and_bidirectional_cache():
    mixer = Attention(mixer_config(Attention, d_model=16, num_heads=2), rngs=nnx.Rngs(0))
    x = jnp.zeros((1, 3, 16))
    with pytest.raises(ValueError, match="segment_ids"):
        mixer(x, segment_ids=jnp.zeros((1, 3), jnp.int32), cache=mixer.init_cache(1, 4))
    encoder = Attention(
        mixer_config(Attention, d_model=16, num_heads=2, causal=False), rngs=nnx.Rngs(0)
    )
    with pytest.raises(ValueError, match="bidirectional"):
        encoder(x, cache=encoder.init_cache(1, 4))


def test_linen_interop():
    """A mixer inside a Linen module through nnx.bridge: init, apply, grad, and the same
    output as the NNX mixer holding the same parameters."""
    config = mixer_config(Mamba2, d_model=16, headdim=8, d_state=4)

    class Model(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.Dense(16)(x)
            return as_linen(Mamba2, config, name="mixer")(h), h

    x = normal(fresh_seed(), (2, 5, 3))
    variables = jax.jit(Model().init)(jax.random.key(0), x)
    (y, h) = jax.jit(Model().apply)(variables, x)
    assert y.shape == (2, 5, 16) and np.all(np.isfinite(np.asarray(y)))
    grads = jax.jit(jax.grad(lambda v: jnp.sum(Model().apply(v, x)[0] ** 2)))(variables)
    assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(nn.unbox(grads)))

    from seqmix.layers import make_mixer

    mixer = make_mixer(Mamba2, config, rngs=nnx.Rngs(1))
    state = nnx.state(mixer, nnx.Param)
    nnx.replace_by_pure_dict(state, nn.unbox(variables)["params"]["mixer"])
    nnx.update(mixer, state)
    assert_close(y, nnx.jit(lambda m, h: m(h))(mixer, h), TOL, "Linen vs NNX")


def test_based_symmetric_taylor_map_is_the_full_maps_mixer_with_a_smaller_state():
    """BASED's default map ("taylor_symmetric") and the full one ("taylor"): the same
    parameters give the same outputs and the same decoding, from a state of
    1 + d + d (d + 1) / 2 features instead of 1 + d + d^2; an unknown map names the key."""
    from seqmix.layers.based import Based

    x = normal(fresh_seed(), (2, 12, 32))
    out, states = {}, {}
    for name in ("taylor", "taylor_symmetric"):
        config = mixer_config(Based, d_model=32, num_heads=2, feature_dim=4, window_size=3)
        config.feature_map = name
        layer = Based(config, rngs=nnx.Rngs(0))
        cache = layer.init_cache(2, 12)
        out[name] = layer(x)
        stepped, cache = layer(x[:, :5], cache=cache)
        out[name + " decode"] = stepped
        states[name] = cache["linear"]["state"].shape
    assert_close(out["taylor_symmetric"], out["taylor"], 1e-5)
    assert_close(out["taylor_symmetric decode"], out["taylor decode"], 1e-5)
    assert_close(out["taylor decode"], out["taylor"][:, :5], 1e-5)
    assert states["taylor"][2] == 1 + 4 + 16 and states["taylor_symmetric"][2] == 1 + 4 + 10
    config = mixer_config(Based, d_model=32, num_heads=2, feature_dim=4)
    config.feature_map = "elu1"
    with pytest.raises(ValueError, match="feature_map"):
        Based(config, rngs=nnx.Rngs(0))
