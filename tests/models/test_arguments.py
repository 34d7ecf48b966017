"""Model and layer configs, model calls, caches and task batches check every argument whose
value is known: a ValueError or TypeError naming the key for a boolean, a fraction or an
out-of-range size, a non-finite or non-positive number where one must be positive, an
unknown dtype, a misspelt implementation mapping, token ids outside the vocabulary and
positions outside the sequence; NumPy and JAX integer scalars are accepted as sizes."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from seqmix.data import make_task
from seqmix.models import build_model, model_config

SETTINGS = settings(max_examples=20, deadline=None, derandomize=True)

LETTER = {
    "attention": "A",
    "linear_attention": "L",
    "retnet": "R",
    "gla": "G",
    "mamba2": "M",
    "mamba": "S",
    "based": "B",
    "gated_deltanet": "D",
}
SMALL = {
    "attention": {"num_heads": 2},
    "linear_attention": {"num_heads": 2},
    "retnet": {"num_heads": 2},
    "gla": {"num_heads": 2},
    "mamba2": {"headdim": 8, "d_state": 4},
    "mamba": {"d_state": 4},
    "based": {"num_heads": 2, "feature_dim": 4, "window_size": 2},
    "gated_deltanet": {"num_heads": 2},
}


def config(mixer: str = "attention", mixer_keys=None, **top):
    keys = dict(SMALL[mixer], **(mixer_keys or {}))
    values = dict(d_model=16, vocab_size=16, layers=LETTER[mixer], mixers={mixer: keys})
    values.update(top)
    return model_config(**values)


def build(cfg):
    """The model's structure only (no parameter is drawn): the checks run all the same."""
    return nnx.eval_shape(lambda: build_model(cfg, rngs=nnx.Rngs(0)))


def assert_names(call, name: str) -> None:
    with pytest.raises((ValueError, TypeError)) as e:
        call()
    assert name in str(e.value), f"{name!r} not named in: {e.value}"


def invalid_ints(minimum: int) -> st.SearchStrategy:
    return st.one_of(
        st.booleans(),
        st.floats().filter(lambda x: not (math.isfinite(x) and x.is_integer())),
        st.integers(min_value=-(2**40), max_value=minimum - 1),
        st.sampled_from(["4", "", "fp16"]),
    )


def invalid_positive_floats() -> st.SearchStrategy:
    return st.one_of(
        st.booleans(),
        st.sampled_from([math.nan, math.inf, -math.inf, "1e4"]),
        st.floats(max_value=0.0, allow_nan=False, allow_infinity=False),
    )


# (mixer, key, smallest valid value): every whole-number key of every mixer
MIXER_INTS = [
    ("attention", "num_heads", 1),
    ("attention", "num_kv_heads", 1),
    ("attention", "head_dim", 1),
    ("attention", "local_window_size", 0),
    ("linear_attention", "num_heads", 1),
    ("linear_attention", "head_dim", 1),
    ("linear_attention", "key_dim", 1),
    ("linear_attention", "chunk_size", 1),
    ("gla", "gate_low_rank_dim", 1),
    ("mamba2", "expand", 1),
    ("mamba2", "headdim", 1),
    ("mamba2", "ngroups", 1),
    ("mamba2", "d_state", 1),
    ("mamba2", "d_conv", 1),
    ("mamba2", "chunk_size", 1),
    ("mamba", "expand", 1),
    ("mamba", "d_state", 1),
    ("mamba", "d_conv", 1),
    ("mamba", "dt_rank", 1),
    ("gated_deltanet", "num_heads", 1),
    ("gated_deltanet", "num_v_heads", 1),
    ("gated_deltanet", "head_dim", 1),
    ("gated_deltanet", "conv_size", 1),
    ("gated_deltanet", "chunk_size", 1),
    ("based", "feature_dim", 1),
    ("based", "window_size", 0),
    ("based", "window_heads", 1),
]

# (mixer, key): keys that must be finite numbers > 0
MIXER_POSITIVE = [
    ("attention", "rope_theta"),
    ("attention", "softcap"),
    ("retnet", "rope_theta"),
    ("gla", "gate_normalizer"),
    ("mamba", "dt_scale"),
    ("gated_deltanet", "expand_v"),
    ("gated_deltanet", "qk_norm_eps"),
]


@pytest.mark.parametrize(
    "mixer,key,minimum", MIXER_INTS, ids=[f"{m}.{k}" for m, k, _ in MIXER_INTS]
)
@SETTINGS
@given(data=st.data())
def test_mixer_sizes_refuse_what_is_not_a_whole_number(mixer, key, minimum, data):
    value = data.draw(invalid_ints(minimum), label=key)
    assert_names(lambda: build(config(mixer, {key: value})), key)


@pytest.mark.parametrize("mixer,key", MIXER_POSITIVE, ids=[f"{m}.{k}" for m, k in MIXER_POSITIVE])
@SETTINGS
@given(data=st.data())
def test_mixer_numbers_refuse_non_finite_and_non_positive_values(mixer, key, data):
    value = data.draw(invalid_positive_floats(), label=key)
    assert_names(lambda: build(config(mixer, {key: value})), key)


@pytest.mark.parametrize("key", ["d_model", "vocab_size", "max_length"])
@SETTINGS
@given(data=st.data())
def test_model_sizes_refuse_what_is_not_a_whole_number(key, data):
    value = data.draw(invalid_ints(1), label=key)
    assert_names(lambda: build(config(**{key: value})), key)


@pytest.mark.parametrize(
    "key,minimum,kind",
    [("num_classes", 1, "classifier"), ("pad_id", 0, "classifier")],
)
@SETTINGS
@given(data=st.data())
def test_classifier_keys_refuse_what_is_not_a_whole_number(key, minimum, kind, data):
    value = data.draw(invalid_ints(minimum), label=key)
    assert_names(lambda: build(config(kind=kind, **{key: value})), key)


@pytest.mark.parametrize("key,minimum", [("multiple_of", 1), ("hidden_size", 1)])
@SETTINGS
@given(data=st.data())
def test_mlp_sizes_refuse_what_is_not_a_whole_number(key, minimum, data):
    value = data.draw(invalid_ints(minimum), label=key)
    assert_names(lambda: build(config(mlp={"type": "swiglu", key: value})), f"mlp.{key}")


@pytest.mark.parametrize("key", ["norm_eps", "mlp.expansion"])
@SETTINGS
@given(data=st.data())
def test_model_numbers_refuse_non_finite_and_non_positive_values(key, data):
    value = data.draw(invalid_positive_floats(), label=key)
    top = {"mlp": {"expansion": value}} if key == "mlp.expansion" else {key: value}
    assert_names(lambda: build(config(**top)), key)


@SETTINGS
@given(dtype=st.one_of(st.sampled_from(["fp16", "bf16", "int32", "float64", ""]), st.integers()))
def test_unknown_dtypes_are_refused(dtype):
    assert_names(lambda: build(config(dtype=dtype)), "dtype")


@pytest.mark.parametrize("layers", [4, 4.0, None, {"A": 1}])
def test_layers_must_be_a_pattern_or_a_list(layers):
    assert_names(lambda: build(config(layers=layers)), "layers")


@pytest.mark.parametrize(
    "implementation,named",
    [
        ({"atention": "naive"}, "'atention'"),
        ({"attention": "nave"}, "'nave'"),
        ({"attention": "pallas_mosaic_gpu"}, "'pallas_mosaic_gpu'"),
        ("fast", "'fast'"),
        (3, "implementation"),
    ],
)
def test_implementation_settings_are_validated(implementation, named):
    with pytest.raises(ValueError) as e:
        build(config(implementation=implementation))
    assert named in str(e.value) and "implementation" in str(e.value)
    with pytest.raises(ValueError) as e:
        build(config("attention", {"implementation": implementation}))
    assert named in str(e.value) and "config.mixers.attention" in str(e.value)


def test_a_misspelt_op_lists_the_valid_ones():
    with pytest.raises(ValueError) as e:
        build(config(implementation={"atention": "naive", "linear_attention": "xla"}))
    for op in ("attention", "decode_attention", "linear_attention", "selective_scan"):
        assert op in str(e.value)


@pytest.mark.parametrize("value", [np.int64(16), np.int32(16), jnp.int32(16), 16.0])
def test_integer_scalars_are_accepted_as_sizes(value):
    want = build(config(d_model=16, mixer_keys={"num_heads": 2}))
    got = build(config(d_model=value, mixer_keys={"num_heads": np.int64(2)}))
    shapes = jax.tree.map(lambda x: x.shape, nnx.state(got, nnx.Param))
    assert shapes == jax.tree.map(lambda x: x.shape, nnx.state(want, nnx.Param))
    assert type(got.backbone.d_model) is int


@pytest.fixture(scope="module")
def lm():
    return build_model(config(mlp=None), rngs=nnx.Rngs(0))


@SETTINGS
@given(
    token=st.one_of(st.integers(-(2**31), -1), st.integers(16, 2**31 - 1)),
    col=st.integers(0, 2),
)
def test_tokens_outside_the_vocabulary_are_refused(lm, token, col):
    tokens = np.ones((2, 3), np.int32)
    tokens[1, col] = token
    with pytest.raises(ValueError) as e:
        lm(jnp.asarray(tokens))
    assert "tokens" in str(e.value) and f"[1, {col}] = {token}" in str(e.value)


def test_tokens_under_jit_are_checked_with_checkify_when_asked(lm):
    from jax.experimental import checkify

    from seqmix import checks

    bad = jnp.asarray([[1, 16, 2]], jnp.int32)
    assert jax.jit(lambda t: lm(t))(bad).shape == (1, 3, 16)  # off by default: no host sync
    with checks.traced_checks():
        err, _ = checkify.checkify(jax.jit(lambda t: lm(t)))(bad)
        ok, _ = checkify.checkify(jax.jit(lambda t: lm(t)))(bad % 16)
    with pytest.raises(Exception, match="tokens holds ids outside the vocabulary"):
        err.throw()
    ok.throw()


@SETTINGS
@given(position=st.one_of(st.integers(-(2**31), -1), st.integers(3, 2**31 - 1)))
def test_positions_outside_the_sequence_are_refused(lm, position):
    positions = jnp.asarray([[0], [position]], jnp.int32)
    assert_names(lambda: lm(jnp.ones((2, 3), jnp.int32), positions=positions), "positions")


@SETTINGS
@given(data=st.data())
def test_init_cache_checks_its_sizes(lm, data):
    batch = data.draw(invalid_ints(0), label="batch_size")
    assert_names(lambda: lm.init_cache(batch, 4), "batch_size")
    length = data.draw(invalid_ints(1), label="max_length")
    assert_names(lambda: lm.init_cache(2, length), "max_length")


def test_init_cache_accepts_integer_scalars(lm):
    cache = lm.init_cache(np.int64(2), jnp.int32(4))
    assert cache[0]["k"].shape[:2] == (2, 4)


@pytest.mark.parametrize("shape", [(0, 3), (2, 0)])
def test_empty_batches_and_sequences_give_empty_logits(lm, shape):
    logits = lm(jnp.zeros(shape, jnp.int32))
    assert logits.shape == (*shape, 16)


@pytest.mark.parametrize("mixer", sorted(SMALL))
def test_every_mixer_computes_an_empty_sequence(mixer):
    model = build_model(config(mixer, mlp=None), rngs=nnx.Rngs(0))
    assert model(jnp.zeros((2, 0), jnp.int32)).shape == (2, 0, 16)


def _task_config(**data):
    import ml_collections

    return ml_collections.ConfigDict(
        {
            "seed": 0,
            "data": {
                "task": "mqar",
                "vocab_size": 32,
                "seq_len": 16,
                "num_kv_pairs": 2,
                "power_a": 0.01,
                "num_eval_batches": 1,
                **data,
            },
            "train": {"batch_size": 2, "eval_batch_size": 2},
        }
    )


def test_task_batches_are_checked_against_the_vocabulary():
    import dataclasses

    task = make_task(_task_config())
    assert task.train_batch(0)["inputs"].max() < task.vocab_size
    broken = dataclasses.replace(task, vocab_size=4)
    assert_names(lambda: broken.train_batch(0), "inputs")
    assert_names(broken.eval_batches, "inputs")
