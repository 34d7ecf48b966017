"""Every public op checks its scalar arguments before dispatch, and computes empty batches
and sequences the same way in every implementation.

Invalid values (booleans where a whole number is expected, fractions, numbers out of range,
NaN or infinite scales, strings) raise ValueError or TypeError naming the argument; NumPy
and JAX integer scalars are accepted where an int is. No kernel runs for an invalid
argument, so these property tests draw many cases in little time.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from seqmix import kernels
from seqmix.kernels import dispatch

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True)

B, T, H, D = 1, 3, 2, 4


def _ones(*shape):
    return jnp.ones(shape, jnp.float32)


# op name -> a call of it on tiny valid inputs, with keyword overrides
CALLS = {
    "attention": lambda b=B, t=T, **kw: kernels.attention(
        _ones(b, t, H, D), _ones(b, t, H, D), _ones(b, t, H, D), **kw
    ),
    "decode_attention": lambda b=B, t=T, lengths=None, **kw: kernels.decode_attention(
        _ones(b, H, D),
        _ones(b, t, H, D),
        _ones(b, t, H, D),
        jnp.full((b,), min(t, 1), jnp.int32) if lengths is None else lengths,
        **kw,
    ),
    "linear_attention": lambda b=B, t=T, **kw: kernels.linear_attention(
        _ones(b, t, H, D), _ones(b, t, H, D), _ones(b, t, H, D), **kw
    ),
    "linear_attention_step": lambda b=B, t=None, **kw: kernels.linear_attention_step(
        _ones(b, H, D), _ones(b, H, D), _ones(b, H, D), jnp.zeros((b, H, D, D)), **kw
    ),
    "gated_delta_rule": lambda b=B, t=T, **kw: kernels.gated_delta_rule(
        _ones(b, t, H, D), _ones(b, t, H, D), _ones(b, t, H, D), jnp.full((b, t, H), 0.5), **kw
    ),
    "gated_delta_rule_step": lambda b=B, t=None, **kw: kernels.gated_delta_rule_step(
        _ones(b, H, D),
        _ones(b, H, D),
        _ones(b, H, D),
        jnp.full((b, H), 0.5),
        _ones(b, H, D, D),
        **kw,
    ),
    "selective_scan": lambda b=B, t=T, A=None, **kw: kernels.selective_scan(
        _ones(b, t, D),
        _ones(b, t, D),
        -_ones(D, 2) if A is None else A,
        _ones(b, t, 2),
        _ones(b, t, 2),
        **kw,
    ),
    "causal_conv1d": lambda b=B, t=T, **kw: kernels.causal_conv1d(
        _ones(b, t, D), _ones(3, D), **kw
    ),
    "causal_conv1d_step": lambda b=B, t=None, **kw: kernels.causal_conv1d_step(
        _ones(b, D), _ones(b, 2, D), _ones(3, D), **kw
    ),
}

# (op, argument, smallest valid value) of every whole-number argument
INT_ARGS = [
    ("attention", "local_window_size", 0),
    ("linear_attention", "chunk_size", 1),
    ("gated_delta_rule", "chunk_size", 1),
]

# (op, argument, must be > 0) of every real-number argument
FLOAT_ARGS = [
    ("attention", "scale", False),
    ("attention", "softcap", True),
    ("decode_attention", "scale", False),
    ("decode_attention", "softcap", True),
    ("linear_attention", "scale", False),
    ("linear_attention_step", "scale", False),
    ("gated_delta_rule", "scale", False),
    ("gated_delta_rule_step", "scale", False),
]


def invalid_ints(minimum: int) -> st.SearchStrategy:
    """Values that are not whole numbers >= minimum."""
    return st.one_of(
        st.booleans(),
        st.floats(allow_nan=True, allow_infinity=True).filter(
            lambda x: not (math.isfinite(x) and x.is_integer())
        ),
        st.integers(max_value=minimum - 1),
        st.text(max_size=3),
        st.just([minimum]),
    )


def invalid_floats(positive: bool) -> st.SearchStrategy:
    values = [
        st.booleans(),
        st.sampled_from([math.nan, math.inf, -math.inf]),
        st.text(max_size=3),
    ]
    if positive:
        values.append(st.floats(max_value=0.0, allow_nan=False))
    return st.one_of(*values)


def assert_names(call, name: str) -> None:
    with pytest.raises((ValueError, TypeError)) as e:
        call()
    assert name in str(e.value), f"{name!r} not named in: {e.value}"


@pytest.mark.parametrize("op,arg,minimum", INT_ARGS, ids=[f"{o}-{a}" for o, a, _ in INT_ARGS])
@SETTINGS
@given(data=st.data())
def test_whole_number_arguments_refuse_other_values(op, arg, minimum, data):
    value = data.draw(invalid_ints(minimum), label=arg)
    assert_names(lambda: CALLS[op](**{arg: value}), arg)


@pytest.mark.parametrize("op,arg,positive", FLOAT_ARGS, ids=[f"{o}-{a}" for o, a, _ in FLOAT_ARGS])
@SETTINGS
@given(data=st.data())
def test_real_number_arguments_refuse_other_values(op, arg, positive, data):
    value = data.draw(invalid_floats(positive), label=arg)
    assert_names(lambda: CALLS[op](**{arg: value}), arg)


@pytest.mark.parametrize("window", [(True, 1), (1, False), (2, 1.5), (-1, 0), (1, 2, 3)])
def test_window_pairs_are_checked_side_by_side(window):
    assert_names(lambda: CALLS["attention"](local_window_size=window), "local_window_size")


@SETTINGS
@given(
    cache=st.integers(1, 4),
    length=st.one_of(st.integers(-(2**31), -1), st.integers(1, 2**31 - 6)),
)
def test_decode_lengths_outside_the_cache_are_refused(cache, length):
    length = length if length < 0 else cache + length
    lengths = jnp.asarray([length], jnp.int32)
    assert_names(lambda: CALLS["decode_attention"](t=cache, lengths=lengths), "lengths")


def test_decode_lengths_are_not_checked_under_jit():
    """Traced lengths cannot be read on the host: no error and no host sync."""
    import jax

    f = jax.jit(lambda n: CALLS["decode_attention"](t=3, lengths=n))
    assert f(jnp.asarray([3], jnp.int32)).shape == (B, H, D)


@pytest.mark.parametrize(
    "op,shape_arg",
    [
        ("attention", "head_dim"),
        ("linear_attention", "key_dim"),
        ("gated_delta_rule", "key_dim"),
        ("linear_attention_step", "key_dim"),
        ("gated_delta_rule_step", "key_dim"),
        ("decode_attention", "head_dim"),
    ],
)
def test_zero_feature_sizes_are_refused(op, shape_arg):
    zero = {
        "attention": lambda: kernels.attention(
            _ones(1, 2, 2, 0), _ones(1, 2, 2, 0), _ones(1, 2, 2, 0)
        ),
        "linear_attention": lambda: kernels.linear_attention(
            _ones(1, 2, 2, 0), _ones(1, 2, 2, 0), _ones(1, 2, 2, 3)
        ),
        "gated_delta_rule": lambda: kernels.gated_delta_rule(
            _ones(1, 2, 2, 0), _ones(1, 2, 2, 0), _ones(1, 2, 2, 3), jnp.full((1, 2, 2), 0.5)
        ),
        "linear_attention_step": lambda: kernels.linear_attention_step(
            _ones(1, 2, 0), _ones(1, 2, 0), _ones(1, 2, 3), _ones(1, 2, 0, 3)
        ),
        "gated_delta_rule_step": lambda: kernels.gated_delta_rule_step(
            _ones(1, 2, 0), _ones(1, 2, 0), _ones(1, 2, 3), jnp.full((1, 2), 0.5), _ones(1, 2, 0, 3)
        ),
        "decode_attention": lambda: kernels.decode_attention(
            _ones(1, 2, 0), _ones(1, 2, 2, 0), _ones(1, 2, 2, 0), jnp.ones((1,), jnp.int32)
        ),
    }[op]
    assert_names(zero, shape_arg)


def test_selective_scan_refuses_a_growing_state():
    assert_names(lambda: CALLS["selective_scan"](A=_ones(D, 2)), "A must be <= 0")


@pytest.mark.parametrize(
    "value", [np.int64(2), np.int32(2), jnp.int32(2), np.asarray(2, np.int64), 2.0]
)
def test_integer_scalars_of_numpy_and_jax_are_accepted(value):
    want = CALLS["attention"](local_window_size=2, causal=True)
    got = CALLS["attention"](local_window_size=value, causal=True)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    np.testing.assert_array_equal(
        np.asarray(CALLS["linear_attention"](chunk_size=value)),
        np.asarray(CALLS["linear_attention"](chunk_size=2)),
    )
    pair = CALLS["attention"](local_window_size=(value, np.int64(0)))
    np.testing.assert_array_equal(np.asarray(pair), np.asarray(want))


def test_numpy_float_scales_are_accepted():
    np.testing.assert_array_equal(
        np.asarray(CALLS["attention"](scale=np.float32(0.5))),
        np.asarray(CALLS["attention"](scale=0.5)),
    )


# (op, the sizes that may be 0): batch and time for sequence ops, batch for one-token steps
EMPTY = [
    ("attention", "b"),
    ("attention", "t"),
    ("decode_attention", "b"),
    ("decode_attention", "t"),
    ("linear_attention", "b"),
    ("linear_attention", "t"),
    ("linear_attention_step", "b"),
    ("gated_delta_rule", "b"),
    ("gated_delta_rule", "t"),
    ("gated_delta_rule_step", "b"),
    ("selective_scan", "b"),
    ("selective_scan", "t"),
    ("causal_conv1d", "b"),
    ("causal_conv1d", "t"),
    ("causal_conv1d_step", "b"),
]


def _expected_empty(op, b, t):
    """The documented result of an empty call: empty outputs; with T == 0 the final state is
    the initial one (zeros); attention over no keys is 0."""
    return {
        "attention": (b, t, H, D),
        "decode_attention": (b, H, D),
        "linear_attention": (b, t, H, D),
        "linear_attention_step": (b, H, D),
        "gated_delta_rule": (b, t, H, D),
        "gated_delta_rule_step": (b, H, D),
        "selective_scan": (b, t, D),
        "causal_conv1d": (b, t, D),
        "causal_conv1d_step": (b, D),
    }[op]


@pytest.mark.parametrize("op,axis", EMPTY, ids=[f"{o}-{a}=0" for o, a in EMPTY])
def test_empty_batch_or_sequence_is_computed_alike_by_every_implementation(op, axis):
    sizes = {"b": B, "t": T, axis: 0}
    ops = dispatch.registered_ops()
    results = {}
    with kernels.interpret():
        for impl in (None, *ops[op].impls):
            if impl is not None and not dispatch.available(impl):
                with pytest.raises(NotImplementedError):
                    CALLS[op](**sizes, implementation=impl)
                continue
            out = CALLS[op](**sizes, implementation=impl)
            out = out[0] if isinstance(out, tuple) else out
            assert out.shape == _expected_empty(op, sizes["b"], sizes["t"])
            assert out.dtype == jnp.float32
            assert not np.isnan(np.asarray(out)).any()
            results[impl] = np.asarray(out)
    assert len(results) >= 2
    first = next(iter(results.values()))
    for got in results.values():
        np.testing.assert_array_equal(got, first)


@pytest.mark.parametrize("op", ["linear_attention", "gated_delta_rule", "selective_scan"])
def test_empty_sequence_keeps_the_initial_state(op):
    state = {
        "linear_attention": jnp.full((B, H, D, D), 0.25),
        "gated_delta_rule": jnp.full((B, H, D, D), 0.25),
        "selective_scan": jnp.full((B, D, 2), 0.25),
    }[op]
    o, final = CALLS[op](t=0, initial_state=state, return_final_state=True)
    assert o.shape[1] == 0
    np.testing.assert_array_equal(np.asarray(final), np.asarray(state))
    _, zero = CALLS[op](t=0, return_final_state=True)
    assert zero.shape == state.shape and zero.dtype == jnp.float32 and not np.asarray(zero).any()


def test_attention_over_no_keys_is_zero_with_lse_minus_inf():
    q = _ones(B, T, H, D)
    o, lse = kernels.attention(q, _ones(B, 0, H, D), _ones(B, 0, H, D), return_lse=True)
    assert o.shape == q.shape and not np.asarray(o).any()
    assert np.all(np.isneginf(np.asarray(lse)))


def test_empty_input_still_checks_the_implementation():
    with pytest.raises(ValueError, match="implementation"):
        CALLS["attention"](b=0, implementation="fast")
    with dispatch.interpret(False):
        if dispatch.platform() == "cpu":
            with pytest.raises(NotImplementedError, match="SEQMIX_INTERPRET"):
                CALLS["linear_attention"](t=0, implementation="pallas_triton")


@SETTINGS
@given(
    key=st.text(min_size=1, max_size=12).filter(lambda s: s not in dispatch.registered_ops()),
    impl=st.sampled_from(["naive", "xla"]),
)
def test_implementation_mappings_refuse_unknown_ops(key, impl):
    with pytest.raises(ValueError) as e:
        dispatch.check_implementation({key: impl})
    assert repr(key) in str(e.value) and "attention" in str(e.value)


@SETTINGS
@given(
    op=st.sampled_from(sorted(dispatch.registered_ops())),
    impl=st.one_of(st.text(max_size=8), st.integers(), st.booleans()).filter(
        lambda s: s not in dispatch.IMPLEMENTATIONS
    ),
)
def test_implementation_mappings_refuse_unknown_implementations(op, impl):
    with pytest.raises(ValueError) as e:
        dispatch.check_implementation({op: impl})
    assert repr(op) in str(e.value)
