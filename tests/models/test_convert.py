"""Converting attention layers into linear attention, GLA and Mamba-2 initialised from their
weights; the layer-by-layer pieces a distillation objective uses; the importance score."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from seqmix import kernels
from seqmix.models import build_model, load_pretrained, model_config
from seqmix.models.builder import model_params
from seqmix.models.convert import (
    CONVERSIONS,
    convert,
    convert_layer,
    initial_log_decay,
    least_important,
    new_parameters,
    replacement_plan,
)
from seqmix.models.layerwise import (
    check_pair,
    forward_with,
    layer_importance,
    logit_kl,
    mixer_inputs,
    mixer_outputs,
)
from seqmix.testing import assert_close, fresh_seed, tolerance

TOL = tolerance("float32")
D_MODEL, VOCAB = 32, 40
# Per-target overrides that make the converted layer plain linear attention (the identity
# feature map, no normalisation); the decay is held at 1 separately (hold_decay_at_one).
IDENTITY = {"linear_attention": {"feature_map": "identity", "normalize": False}}


def teacher_config(bias: str = "qkv", layers: str = "AAAA", **attention):
    att = {"num_heads": 4, "num_kv_heads": 2, "qkv_bias": bias == "qkv", "use_bias": bias == "all"}
    att.update(attention)
    return model_config(layers=layers, d_model=D_MODEL, vocab_size=VOCAB, mixers={"attention": att})


def random_teacher(config, seed):
    """A teacher whose biases and norm scales are random too (so that none drops out)."""
    model = build_model(config, rngs=nnx.Rngs(seed))
    graphdef, state = nnx.split(model)
    keys = iter(jax.random.split(jax.random.key(seed), 1000))
    state = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(next(keys), x.shape), state)
    return nnx.merge(graphdef, state)


def hold_decay_at_one(mixer) -> None:
    """Sets the converted mixer's decay to exactly 1 (log decay 0)."""
    if getattr(mixer, "decay", None) == "data":  # GLA: logsigmoid(1e4) = 0 in float32
        mixer.gate_up.bias[...] = jnp.full(mixer.gate_up.bias[...].shape, 1e4)
    if hasattr(mixer, "A_log"):  # Mamba-2: A = -exp(-1e4) = 0
        mixer.A_log[...] = jnp.full(mixer.A_log[...].shape, -1e4)


def tokens(seed, shape=(2, 13)):
    return jax.random.randint(jax.random.key(seed), shape, 0, VOCAB)


@pytest.mark.parametrize("bias", ["none", "qkv", "all"])
@pytest.mark.parametrize("target", sorted(CONVERSIONS))
def test_converted_layer_is_linear_attention_of_the_teacher_projections(target, bias):
    """With its decay held at 1 (and the identity feature map) the converted mixer computes
    ``o_proj(linear_attention(q, k, v))`` of the teacher layer's own q, k, v projections."""
    seed = fresh_seed()
    config = teacher_config(bias)
    teacher = random_teacher(config, seed)
    attention = teacher.backbone.layers[1].mixer
    mixer = convert_layer(attention, target, config, overrides=IDENTITY.get(target))
    hold_decay_at_one(mixer)
    x = jax.random.normal(jax.random.key(seed + 1), (2, 11, D_MODEL))
    B, T, H, Hkv, Dh = 2, 11, 4, 2, D_MODEL // 4
    q = attention.q_proj(x).reshape(B, T, H, Dh)
    k = jnp.repeat(attention.k_proj(x).reshape(B, T, Hkv, Dh), H // Hkv, axis=2)
    v = jnp.repeat(attention.v_proj(x).reshape(B, T, Hkv, Dh), H // Hkv, axis=2)
    o = kernels.linear_attention(q, k, v, scale=Dh**-0.5, implementation="naive")
    want = attention.o_proj(o.reshape(B, T, H * Dh))
    assert_close(mixer(x), want, TOL, f"{target} output")


@pytest.mark.parametrize("target", ["gla", "mamba2"])
def test_initial_decay_is_the_documented_one(target):
    """Per-head log decay g_h (half-lives 16 .. 4096 tokens) whatever the input."""
    config = teacher_config()
    teacher = random_teacher(config, fresh_seed())
    mixer = convert_layer(teacher.backbone.layers[0].mixer, target, config)
    g = initial_log_decay(4)
    np.testing.assert_allclose(np.log(0.5) / g, np.geomspace(16, 4096, 4), rtol=1e-5)
    x = jax.random.normal(jax.random.key(fresh_seed()), (2, 5, D_MODEL))
    if target == "gla":
        got = mixer._log_decay(x)  # [B, T, H, K]
        want = jnp.broadcast_to(g[None, None, :, None], got.shape)
    else:
        dt = jax.nn.softplus(mixer.dt_bias[...])
        got = -jnp.exp(mixer.A_log[...]) * dt
        want = g
        assert_close(dt, np.full(4, (D_MODEL // 4) ** -0.5), TOL, "dt")
        np.testing.assert_array_equal(np.asarray(mixer.D[...]), 0.0)
    assert_close(got, want, TOL, "log decay")


@pytest.mark.parametrize("target", sorted(CONVERSIONS))
def test_student_keeps_every_other_teacher_parameter(target):
    config = teacher_config()
    teacher = random_teacher(config, fresh_seed())
    student = convert(teacher, config, [0, 2], target)
    assert student.replaced == {0: target, 2: target}
    assert student.model.layer_names == (target, "attention", target, "attention")
    theirs, ours = model_params(teacher), model_params(student.model)
    for path, value in ours.items():
        replaced = path[:2] == ("backbone", "layers") and path[2] in (0, 2) and path[3] == "mixer"
        if not replaced:
            np.testing.assert_array_equal(value, theirs[path], err_msg=str(path))
    # The student is the teacher run with those two mixers swapped, and nothing else.
    mixers = {i: student.model.backbone.layers[i].mixer for i in (0, 2)}
    toks = tokens(fresh_seed())
    assert_close(student.model(toks), forward_with(teacher, toks, mixers), TOL, "logits")


def test_new_parameters_are_the_replaced_mixers():
    config = teacher_config()
    teacher = random_teacher(config, fresh_seed())
    student = convert(teacher, config, [1, 3], "gla")
    new = nnx.to_flat_state(nnx.state(student.model, new_parameters(student.replaced)))
    paths = {path for path, _ in new}
    want = {p for p in model_params(student.model) if p[2:4] in ((1, "mixer"), (3, "mixer"))}
    assert paths == want and paths


def test_student_config_builds_the_student():
    config = teacher_config()
    teacher = random_teacher(config, fresh_seed())
    student = convert(teacher, config, "AMAG")
    assert student.replaced == {1: "mamba2", 3: "gla"}
    rebuilt = build_model(student.config, rngs=nnx.Rngs(0))
    shapes = jax.tree.map(jnp.shape, nnx.state(rebuilt, nnx.Param))
    assert shapes == jax.tree.map(jnp.shape, nnx.state(student.model, nnx.Param))
    assert student.config.mixers.mamba2.ngroups == 4 and student.config.mixers.mamba2.expand == 1


def test_pattern_and_indices_choose_the_same_layers():
    config = teacher_config()
    assert replacement_plan(config, "AMAM") == replacement_plan(config, [3, 1], "mamba2")
    assert replacement_plan(config, "A A L A") == {2: "linear_attention"}


def test_overrides_apply_and_teacher_keys_are_fixed():
    config = teacher_config()
    teacher = random_teacher(config, fresh_seed())
    student = convert(teacher, config, [1], "mamba2", mixers={"mamba2": {"gated_norm": True}})
    mixer = student.model.backbone.layers[1].mixer
    assert mixer.gated_norm and mixer.norm is not None
    with pytest.raises(ValueError, match=r"mixers\.mamba2\.headdim"):
        convert(teacher, config, [1], "mamba2", mixers={"mamba2": {"headdim": 4}})
    with pytest.raises(ValueError, match="unknown keys"):
        convert(teacher, config, [1], "gla", mixers={"gla": {"no_such_key": 1}})


def test_converting_an_hf_checkpoint():
    """A Qwen2 checkpoint (GQA, q/k/v biases, bfloat16 files) into Mamba-2 layers."""
    path = os.path.join(os.path.dirname(__file__), "..", "fixtures", "hf", "qwen2")
    teacher, config, _ = load_pretrained(path)
    student = convert(teacher, config, [1], "mamba2")
    logits = student.model(tokens(fresh_seed(), (1, 9)))
    assert logits.shape == (1, 9, 48) and np.all(np.isfinite(np.asarray(logits)))
    assert student.model.backbone.layers[1].mixer.in_proj.bias is not None


# ---------------------------------------------------------------- layer by layer


def test_forward_with_no_replacement_is_the_model():
    config = teacher_config()
    teacher = random_teacher(config, fresh_seed())
    toks = tokens(fresh_seed())
    np.testing.assert_array_equal(np.asarray(forward_with(teacher, toks, {})), teacher(toks))


def test_mixer_inputs_are_what_each_mixer_receives():
    """Layer i's input is its block norm of the residual stream after layers < i; the
    teacher's attention on it reproduces the teacher's own residual update."""
    config = teacher_config()
    teacher = random_teacher(config, fresh_seed())
    toks = tokens(fresh_seed())
    inputs = mixer_inputs(teacher, toks)
    outputs = mixer_outputs(teacher, inputs)
    x = teacher.backbone.embed(toks).astype(jnp.float32)
    for i, block in enumerate(teacher.backbone.layers):
        assert_close(inputs[i], block.norm(x), TOL, f"input {i}")
        h = x + outputs[i]
        want = h + block.mlp(block.mlp_norm(h))
        x = block(x)
        assert_close(want, x, TOL, f"layer {i}")
    assert set(mixer_inputs(teacher, toks, layers=[2])) == {2}


def test_teacher_and_student_mixers_on_the_same_hidden_states():
    """Attention transfer's two sides: the teacher's attention and the student's mixer on
    the teacher's hidden states of the replaced layer."""
    config = teacher_config()
    teacher = random_teacher(config, fresh_seed())
    student = convert(teacher, config, [2], "gla")
    toks = tokens(fresh_seed())
    h = mixer_inputs(teacher, toks, layers=student.replaced)
    target, pred = mixer_outputs(teacher, h), mixer_outputs(student.model, h)
    assert set(target) == set(pred) == {2}
    direct = student.model.backbone.layers[2].mixer(h[2])
    np.testing.assert_array_equal(np.asarray(pred[2]), np.asarray(direct))
    assert target[2].shape == pred[2].shape == (2, 13, D_MODEL)
    # Layers before the replaced one are shared, so the student sees the same input there.
    assert_close(mixer_inputs(student.model, toks, layers=[2])[2], h[2], TOL, "shared input")


def test_logit_kl():
    key = jax.random.key(fresh_seed())
    t, s = (
        jax.random.normal(key, (2, 3, 7)),
        jax.random.normal(jax.random.fold_in(key, 1), (2, 3, 7)),
    )
    assert float(logit_kl(t, t)) == pytest.approx(0.0, abs=1e-7)
    p, q = jax.nn.softmax(t / 2.0), jax.nn.softmax(s / 2.0)
    want = np.mean(np.sum(p * (np.log(p) - np.log(q)), axis=-1))
    assert float(logit_kl(t, s, temperature=2.0)) == pytest.approx(float(want), rel=1e-5)
    mask = jnp.array([[1, 0, 0], [0, 0, 0]])
    first = np.sum(p[0, 0] * (np.log(p[0, 0]) - np.log(q[0, 0])))
    assert float(logit_kl(t, s, temperature=2.0, mask=mask)) == pytest.approx(
        float(first), rel=1e-5
    )


def test_layer_importance_is_the_kl_of_each_layer_replaced_alone():
    config = teacher_config()
    teacher = random_teacher(config, fresh_seed())
    toks = tokens(fresh_seed())
    scores = layer_importance(teacher, config, toks, "mamba2", candidates=[0, 1, 3])
    assert set(scores) == {0, 1, 3} and all(s > 0 for s in scores.values())
    one = convert(teacher, config, [3], "mamba2")
    assert scores[3] == pytest.approx(float(logit_kl(teacher(toks), one.model(toks))), rel=1e-4)
    assert least_important(scores, 2) == sorted(sorted(scores, key=scores.get)[:2])
    assert least_important({0: 1.0, 1: 1.0, 2: 0.5}, 2) == [0, 2]


# ---------------------------------------------------------------- errors


def test_mismatched_teacher_and_student_raise():
    config = teacher_config()
    teacher = random_teacher(config, 0)
    wide = model_config(layers="AAAA", d_model=48, vocab_size=VOCAB)
    small_vocab = model_config(layers="AAAA", d_model=D_MODEL, vocab_size=VOCAB - 1)
    with pytest.raises(ValueError, match="vocab_size"):
        check_pair(teacher, build_model(small_vocab, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="d_model"):
        check_pair(teacher, build_model(wide, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="differ in shape"):
        logit_kl(jnp.zeros((1, 2, VOCAB)), jnp.zeros((1, 2, VOCAB - 1)))
    with pytest.raises(ValueError, match="d_model"):
        convert(teacher, wide, [0], "gla")


def test_bad_choices_raise():
    config = teacher_config(layers="AMAA")
    teacher = random_teacher(config, 0)
    with pytest.raises(ValueError, match="layer 1 is 'mamba2'"):
        convert(teacher, config, [1], "gla")
    with pytest.raises(ValueError, match="no conversion from attention"):
        convert(teacher, config, [0], "mamba")
    with pytest.raises(ValueError, match="unknown mixer"):
        convert(teacher, config, [0], "nope")
    with pytest.raises(ValueError, match="distinct indices"):
        convert(teacher, config, [0, 4], "gla")
    with pytest.raises(ValueError, match="5 letters"):
        convert(teacher, config, "AMAAG")
    with pytest.raises(ValueError, match="mixer must be None"):
        convert(teacher, config, "AMAG", "gla")
    wide_heads = teacher_config(num_heads=3, num_kv_heads=1, head_dim=8)
    with pytest.raises(ValueError, match="multiple of d_model"):
        convert(random_teacher(wide_heads, 0), wide_heads, [0], "mamba2")
