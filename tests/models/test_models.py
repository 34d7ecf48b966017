"""Model configs, the builder, hybrids, caches at the model level, generate, param_count."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from seqmix.layers import Attention, Bidirectional, GatedDeltaNet, Mamba, Mamba2
from seqmix.models import (
    MIXERS,
    CausalLM,
    SequenceClassifier,
    build_model,
    generate,
    model_config,
    param_count,
)
from seqmix.testing import assert_close, fresh_seed

TINY = {
    "mamba2": {"headdim": 8, "d_state": 8},
    "mamba": {"d_state": 4},
    "based": {"window_size": 3, "feature_dim": 4},
    "gated_deltanet": {"num_heads": 2, "chunk_size": 4},
    "deltanet": {"num_heads": 2, "chunk_size": 4},
}


def abstract(config):
    """The model with shape-only parameters (nothing is computed): for structure tests."""
    return nnx.eval_shape(lambda: build_model(config, rngs=nnx.Rngs(0)))


def forward(model, toks):
    return nnx.jit(lambda m, t: m(t))(model, toks)


def tiny(**overrides):
    values = dict(d_model=32, vocab_size=50, mixers=TINY)
    values.update(overrides)
    return model_config(**values)


def tokens(seed, shape, vocab=50, low=0):
    return jax.random.randint(jax.random.key(seed), shape, low, vocab)


def test_a_two_layer_hybrid_builds_and_runs():
    model = build_model(
        model_config(layers=["mamba2", "attention"], d_model=64, vocab_size=100), rngs=nnx.Rngs(0)
    )
    assert isinstance(model, CausalLM)
    logits = forward(model, tokens(fresh_seed(), (2, 7), 100))
    assert logits.shape == (2, 7, 100) and logits.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(logits)))


def test_model_config_has_every_mixer_and_validates_keys():
    config = model_config()
    assert set(config.mixers) == set(MIXERS)
    for key in (
        "kind",
        "vocab_size",
        "d_model",
        "layers",
        "legend",
        "num_classes",
        "mlp",
        "tie_embeddings",
        "dtype",
        "norm_eps",
        "max_length",
        "pad_id",
    ):
        assert key in config
    merged = model_config(mixers={"attention": {"num_heads": 2}}, mlp=None)
    assert merged.mixers.attention.num_heads == 2 and merged.mixers.attention.rope
    assert merged.mlp.type is None
    with pytest.raises(ValueError, match="d_modle"):
        model_config(d_modle=3)
    with pytest.raises(ValueError, match="num_head"):
        model_config(mixers={"attention": {"num_head": 2}})
    with pytest.raises(ValueError, match="registered mixers"):
        model_config(mixers={"mamba3": {}})


def test_hybrid_from_pattern_has_the_layer_kinds_in_order():
    config = tiny(layers="MMMA", legend={"M": "mamba2", "A": "attention"})
    model = abstract(config)
    assert model.layer_names == ("mamba2", "mamba2", "mamba2", "attention")
    kinds = [type(layer.mixer) for layer in model.backbone.layers]
    assert kinds == [Mamba2, Mamba2, Mamba2, Attention]
    model = abstract(tiny(layers=["mamba", "attention", "mamba2"]))
    assert [type(layer.mixer) for layer in model.backbone.layers] == [Mamba, Attention, Mamba2]


def test_classifier_uses_bidirectional_forms():
    model = abstract(tiny(kind="classifier", layers="MA", num_classes=3))
    assert isinstance(model, SequenceClassifier)
    mixers = [layer.mixer for layer in model.backbone.layers]
    assert isinstance(mixers[0], Bidirectional) and isinstance(mixers[0].fwd, Mamba2)
    assert isinstance(mixers[1], Attention) and not mixers[1].causal


def test_unknown_names_list_the_registered_mixers():
    with pytest.raises(ValueError, match="mamba3") as info:
        build_model(tiny(layers=["mamba2", "mamba3"]), rngs=nnx.Rngs(0))
    assert all(name in str(info.value) for name in MIXERS)
    with pytest.raises(ValueError, match=r"letter 'X'.*legend"):
        build_model(tiny(layers="MX"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="kind"):
        build_model(tiny(kind="seq2seq"), rngs=nnx.Rngs(0))


def test_inconsistent_sizes_raise_naming_the_keys():
    with pytest.raises(ValueError, match=r"mixers\.attention.*d_model \(30\).*num_heads"):
        build_model(tiny(layers=["attention"], d_model=30), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"mixers\.attention.*num_kv_heads \(3\)"):
        build_model(
            tiny(layers=["attention"], mixers={"attention": {"num_kv_heads": 3}}), rngs=nnx.Rngs(0)
        )


def test_param_count_matches_a_manual_count():
    V, d, H, Hkv = 50, 32, 4, 2
    config = tiny(
        layers=["attention", "attention"],
        tie_embeddings=False,
        mixers={"attention": {"num_heads": H, "num_kv_heads": Hkv}},
        mlp={"type": "swiglu", "expansion": 3.0},
    )
    model = abstract(config)
    D = d // H
    hidden = 64  # 3 * 32 * 2/3
    attention = d * H * D + 2 * d * Hkv * D + H * D * d
    block = 2 * d + attention + 3 * d * hidden
    assert param_count(model) == V * d + 2 * block + d + d * V
    tied = abstract(model_config(**{**config.to_dict(), "tie_embeddings": True}))
    assert param_count(tied) == param_count(model) - d * V


def test_every_parameter_has_logical_axes():
    model = abstract(tiny(layers="ALRGMSBDN", tie_embeddings=False))
    names = {"vocab", "embed", "mlp", "heads", "kv", "state", "conv", None}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        axes = var.get_metadata().get("out_sharding")
        assert axes is not None and len(axes) == len(var.get_value().shape), path
        assert set(axes) <= names, (path, axes)
    with nn.logical_axis_rules(
        [
            ("embed", "fsdp"),
            ("vocab", None),
            ("mlp", None),
            ("heads", None),
            ("kv", None),
            ("state", None),
            ("conv", None),
        ]
    ):
        specs = nnx.get_partition_spec(nnx.state(model, nnx.Param))
    assert specs["backbone"]["embed"]["embedding"].get_value() == jax.sharding.PartitionSpec(
        None, "fsdp"
    )


# Every mixer's own decoding, causality and segments are tested in tests/layers; here a
# three-kind hybrid checks the model-level plumbing.
HYBRID = "MSA"


@pytest.fixture(scope="module")
def hybrid():
    return build_model(tiny(layers=HYBRID), rngs=nnx.Rngs(0))


def test_model_cache_decoding_equals_forward(hybrid):
    toks = tokens(fresh_seed(), (2, 8))
    full = forward(hybrid, toks)
    step = nnx.jit(lambda m, t, c: m(t, cache=c))
    cache = hybrid.init_cache(2, 8)
    logits = []
    for lo, hi in ((0, 5), (5, 6), (6, 7), (7, 8)):
        out, cache = step(hybrid, toks[:, lo:hi], cache)
        logits.append(out)
    assert len(cache) == len(HYBRID)
    assert_close(jnp.concatenate(logits, axis=1), full, 1e-4, "prefill then steps")


def test_generate_greedy_is_deterministic_and_argmax_of_forward(hybrid):
    prompt = tokens(fresh_seed(), (2, 4))
    out = generate(hybrid, prompt, 6)
    again = generate(hybrid, prompt, 6)
    assert out.shape == (2, 10)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(again))
    np.testing.assert_array_equal(np.asarray(out[:, :4]), np.asarray(prompt))
    logits = forward(hybrid, out)
    np.testing.assert_array_equal(
        np.asarray(jnp.argmax(logits[:, 3:-1], -1)), np.asarray(out[:, 4:])
    )


def test_generate_sampling(hybrid):
    prompt = tokens(fresh_seed(), (2, 4))
    with pytest.raises(ValueError, match="rng"):
        generate(hybrid, prompt, 6, temperature=1.0)
    a = generate(hybrid, prompt, 6, temperature=1.0, rng=jax.random.key(1))
    b = generate(hybrid, prompt, 6, temperature=1.0, rng=jax.random.key(1))
    c = generate(hybrid, prompt, 6, temperature=1.0, rng=jax.random.key(2))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert a.shape == (2, 10) and np.all((np.asarray(a) >= 0) & (np.asarray(a) < 50))
    assert not np.array_equal(np.asarray(a), np.asarray(c))  # 12 draws from 50 tokens


def test_classifier_ignores_padding():
    """Logits of a padded row equal those of the same tokens unpadded (bidirectional
    mixers keep padding out of the real tokens' context; pooling skips it)."""
    model = build_model(tiny(kind="classifier", layers="MA", num_classes=3), rngs=nnx.Rngs(0))
    apply = nnx.jit(lambda m, t: m(t))
    toks = tokens(fresh_seed(), (2, 6), low=1)
    padded = jnp.concatenate([toks, jnp.zeros((2, 3), toks.dtype)], axis=1)
    logits = apply(model, padded)
    assert logits.shape == (2, 3) and logits.dtype == jnp.float32
    assert_close(logits, apply(model, toks), 1e-4, "padded vs unpadded")


def test_bfloat16_compute_keeps_float32_params():
    model = build_model(tiny(layers="MA", dtype="bfloat16"), rngs=nnx.Rngs(0))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    logits = forward(model, tokens(fresh_seed(), (2, 5)))
    assert logits.dtype == jnp.float32 and np.all(np.isfinite(np.asarray(logits)))


def test_gated_deltanet_hybrid_from_pattern_decodes_and_generates():
    """``layers="DDDA"``: three Gated DeltaNet layers and attention, built from the pattern;
    prefill then one token at a time equals the full forward, and greedy ``generate``
    continues with the forward's argmax."""
    model = build_model(tiny(layers="DDDA"), rngs=nnx.Rngs(0))
    kinds = [type(layer.mixer) for layer in model.backbone.layers]
    assert kinds == [GatedDeltaNet] * 3 + [Attention]
    toks = tokens(fresh_seed(), (2, 9))
    full = forward(model, toks)
    step = nnx.jit(lambda m, t, c: m(t, cache=c))
    cache = model.init_cache(2, 9)
    logits = []
    for lo, hi in ((0, 6), (6, 7), (7, 8), (8, 9)):
        out, cache = step(model, toks[:, lo:hi], cache)
        logits.append(out)
    assert_close(jnp.concatenate(logits, axis=1), full, 1e-4, "prefill then steps")
    out = generate(model, toks[:, :4], 5)
    np.testing.assert_array_equal(
        np.asarray(jnp.argmax(forward(model, out)[:, 3:-1], -1)), np.asarray(out[:, 4:])
    )
