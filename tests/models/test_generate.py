"""generate's controls (max_new_tokens, temperature, top-k, top-p, stop tokens, new tokens
only), its argument checks, and the byte task's encode/decode."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from seqmix.data.bytes import decode, encode
from seqmix.models import build_model, generate, model_config
from seqmix.models.generate import filter_logits
from seqmix.testing import fresh_seed

VOCAB = 40


@pytest.fixture(scope="module")
def lm():
    config = model_config(
        vocab_size=VOCAB,
        d_model=16,
        layers="MA",
        mixers={"mamba2": {"headdim": 8, "d_state": 8}, "attention": {"num_heads": 2}},
    )
    return build_model(config, rngs=nnx.Rngs(0))


def prompt_of(shape=(3, 5)):
    return jax.random.randint(jax.random.key(fresh_seed()), shape, 0, VOCAB)


def test_greedy_new_tokens_only_is_the_tail_of_the_full_output(lm):
    prompt = prompt_of()
    full = generate(lm, prompt, max_new_tokens=7)
    new = generate(lm, prompt, max_new_tokens=7, new_tokens_only=True)
    assert full.shape == (3, 12) and new.shape == (3, 7) and new.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(full[:, 5:]), np.asarray(new))
    np.testing.assert_array_equal(np.asarray(full[:, :5]), np.asarray(prompt))
    # the former name of the argument gives the same tokens
    np.testing.assert_array_equal(np.asarray(generate(lm, prompt, num_steps=7)), full)
    assert generate(lm, prompt, 0, new_tokens_only=True).shape == (3, 0)


def test_top_k_1_is_greedy_at_any_temperature(lm):
    prompt = prompt_of()
    greedy = generate(lm, prompt, 6)
    sampled = generate(lm, prompt, 6, temperature=5.0, top_k=1, rng=jax.random.key(3))
    np.testing.assert_array_equal(np.asarray(sampled), np.asarray(greedy))


def test_a_tiny_top_p_is_greedy_and_top_p_1_samples_everything(lm):
    prompt = prompt_of()
    greedy = generate(lm, prompt, 6)
    nucleus = generate(lm, prompt, 6, temperature=1.0, top_p=1e-6, rng=jax.random.key(4))
    np.testing.assert_array_equal(np.asarray(nucleus), np.asarray(greedy))
    hot = generate(lm, prompt_of((8, 2)), 24, temperature=50.0, top_p=1.0, rng=jax.random.key(5))
    assert len(np.unique(np.asarray(hot[:, 2:]))) > 15  # nearly uniform over 40 tokens


def test_filter_logits_keeps_the_top_k_and_the_nucleus():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]], jnp.float32))
    kept = lambda out: np.isfinite(np.asarray(out))[0].tolist()
    assert kept(filter_logits(logits, top_k=2, top_p=None)) == [True, True, False, False]
    assert kept(filter_logits(logits, top_k=None, top_p=0.5)) == [True, False, False, False]
    assert kept(filter_logits(logits, top_k=None, top_p=0.75)) == [True, True, False, False]
    assert kept(filter_logits(logits, top_k=None, top_p=0.81)) == [True, True, True, False]
    assert kept(filter_logits(logits, top_k=3, top_p=0.99)) == [True, True, True, False]


def test_sampling_at_top_k_draws_only_the_k_most_likely_tokens(lm):
    prompt = prompt_of((16, 4))
    logits = nnx.jit(lambda m, t: m(t))(lm, prompt)[:, -1]
    top3 = np.asarray(jax.lax.top_k(logits, 3)[1])
    first = generate(
        lm, prompt, 1, temperature=3.0, top_k=3, rng=jax.random.key(6), new_tokens_only=True
    )
    assert all(int(first[i, 0]) in top3[i] for i in range(16))


def test_rows_stop_at_a_stop_token_and_are_padded_after_it(lm):
    prompt = prompt_of((4, 3))
    free = np.asarray(generate(lm, prompt, 10, new_tokens_only=True))
    stop = int(free[0, 2])  # a token row 0 emits greedily at its third step
    out = np.asarray(generate(lm, prompt, 10, stop_tokens=[stop], new_tokens_only=True))
    for row, (f, o) in enumerate(zip(free, out)):
        hits = np.flatnonzero(f == stop)
        end = hits[0] + 1 if hits.size else len(f)
        np.testing.assert_array_equal(o[:end], f[:end], err_msg=f"row {row}")
        assert (o[end:] == -1).all(), f"row {row}: {o}"
    end0 = int(np.flatnonzero(free[0] == stop)[0]) + 1  # row 0 ends by its third token
    assert end0 <= 3 and out[0, end0 - 1] == stop and (out[0, end0:] == -1).all()
    padded = np.asarray(generate(lm, prompt, 10, stop_tokens=stop, pad_token=0))
    assert (padded[0, 3 + end0 :] == 0).all()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(max_new_tokens=2.0), r"max_new_tokens must be an integer >= 0, got 2.0"),
        (dict(num_steps=3.5), r"num_steps must be an integer >= 0, got 3.5"),
        (dict(max_new_tokens=True), r"max_new_tokens must be an integer >= 0, got the bool"),
        (dict(max_new_tokens=-1), r"max_new_tokens must be an integer >= 0, got -1"),
        (dict(max_new_tokens=2, num_steps=2), r"max_new_tokens or num_steps"),
        (dict(max_new_tokens=2, temperature=float("nan")), r"temperature must be a finite"),
        (dict(max_new_tokens=2, temperature=float("inf")), r"temperature must be a finite"),
        (dict(max_new_tokens=2, temperature=-0.5), r"temperature must be >= 0"),
        (dict(max_new_tokens=2, top_k=0), r"top_k must be an integer >= 1"),
        (dict(max_new_tokens=2, top_k=2.5), r"top_k must be an integer >= 1"),
        (dict(max_new_tokens=2, top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(max_new_tokens=2, top_p=1.5), r"top_p must be in \(0, 1\]"),
        (dict(max_new_tokens=2, stop_tokens=[VOCAB]), r"stop_tokens: 40 is outside"),
        (dict(max_new_tokens=2, temperature=1.0), r"rng \(a jax.random key\) is required"),
    ],
)
def test_bad_arguments_are_refused_naming_the_argument(lm, kwargs, match):
    with pytest.raises(ValueError, match=match):
        generate(lm, prompt_of(), **kwargs)


def test_integer_scalars_of_numpy_and_jax_are_accepted(lm):
    prompt = prompt_of()
    expected = generate(lm, prompt, 3)
    for n in (np.int64(3), jnp.int32(3)):
        np.testing.assert_array_equal(np.asarray(generate(lm, prompt, n)), expected)


@pytest.mark.parametrize("bad", [VOCAB, -1])
def test_prompt_tokens_outside_the_vocabulary_are_refused(lm, bad):
    prompt = np.array(prompt_of())
    prompt[1, 2] = bad
    with pytest.raises(ValueError, match=rf"prompt\[1, 2\] = {bad}"):
        generate(lm, prompt, 2)


def test_a_classifier_cannot_generate():
    config = model_config(kind="classifier", vocab_size=VOCAB, d_model=16, layers="A")
    classifier = build_model(config, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"model must be a causal language model.*Classifier"):
        generate(classifier, prompt_of(), 2)


def test_bytes_encode_and_decode_round_trip():
    text = "def f(x):\n    return 'héllo' + \"€\"\n"
    tokens = encode(text)
    assert tokens.dtype == np.int32 and tokens.max() < 256 and len(tokens) == len(text.encode())
    assert decode(tokens) == text
    assert decode(list(tokens) + [-1, 65, 66]) == text  # padding ends the text
    assert decode(encode("é")[:1]) == "\ufffd"  # a cut character is replaced, not an error
    with pytest.raises(ValueError, match=r"tokens\[1\] = 300"):
        decode([65, 300])
    with pytest.raises(ValueError, match=r"1-D"):
        decode(np.zeros((2, 3), np.int32))
