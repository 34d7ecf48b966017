"""Property-based: over random shapes, masks, windows, packed segments, cache lengths and
chunk sizes, a NaN or Inf injected at a masked position never changes an output it cannot
reach, in every implementation that runs on the CPU (the Pallas kernels in interpret mode;
the README's reliability notes): ``attention``, ``decode_attention``, ``linear_attention``
and ``gated_delta_rule``. The rows it does reach are not finite. Fixed cases, gradients
and cuDNN are in the ops' ``test_masked_values.py`` and ``test_cudnn.py``."""

import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from seqmix import testing
from seqmix.kernels import (
    attention,
    decode_attention,
    gated_delta_rule,
    interpret,
    linear_attention,
)
from seqmix.kernels.attention.reference import visible

# every example compiles its own shapes: few examples, no per-example deadline
FEW = settings(
    max_examples=5,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    derandomize=False,
)
BAD = st.sampled_from([np.nan, np.inf, -np.inf])
IMPLS = ["naive", "xla", "pallas_triton", "pallas_tpu"]
_JITTED = {}


def _jit(op, **static):
    """``op`` jitted with ``static`` keyword arguments, one compiled function per setting and
    shape (the examples draw from a few shapes, so most of them reuse a compilation); the
    Pallas kernels run in interpret mode. Arguments an implementation does not serve (a
    head dim, a chunk size) reject the example."""
    key = (op.__name__, tuple(sorted(static.items())))
    if key not in _JITTED:
        _JITTED[key] = jax.jit(functools.partial(op, **static))

    def run(*args, **kwargs):
        with interpret():
            try:
                return _JITTED[key](*args, **kwargs)
            except NotImplementedError:
                assume(False)

    return run


def _segments(draw, B: int, T: int):
    """None, or sorted ids in [0, 4) per row (runs of random lengths)."""
    if not draw(st.booleans()):
        return None
    rows = [sorted(draw(st.lists(st.integers(0, 3), min_size=T, max_size=T))) for _ in range(B)]
    return np.asarray(rows, np.int32)


def _inject(x, positions, value, whole: bool):
    """``x [B, T, ...]`` with ``value`` at each token of ``positions`` (every element of the
    token, or its first element only)."""
    x = np.array(x)
    for s in positions:
        if whole:
            x[:, s] = value
        else:
            x[(slice(None), s) + (0,) * (x.ndim - 2)] = value
    return jnp.asarray(x)


def _reached(t_len: int, positions, runs):
    """``[B, T]``: rows that a bad token at ``positions`` reaches in a recurrence (at or after
    it, in its run)."""
    t = np.arange(t_len)
    B = 1 if runs is None else runs.shape[0]
    hit = np.zeros((B, t_len), bool)
    for s in positions:
        same = np.ones((B, t_len), bool) if runs is None else runs == runs[:, s : s + 1]
        hit |= same & (t[None] >= s)
    return hit


def _compare(out, ref, hit, what: str):
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    hit = np.broadcast_to(hit, out.shape[:2])
    if (~hit).any():
        testing.assert_close(out[~hit], ref[~hit], 1e-5, f"{what}: rows the bad token cannot reach")
    if hit.any():
        rows = out[hit].reshape(int(hit.sum()), -1)
        assert not np.all(np.isfinite(rows), axis=-1).any(), f"{what}: a reached row is finite"


@pytest.mark.parametrize("impl", IMPLS)
@FEW
@given(data=st.data(), value=BAD)
def test_attention_values_at_masked_keys(impl, data, value):
    draw = data.draw
    B, T, Hkv = 2, draw(st.sampled_from([12, 24])), draw(st.sampled_from([1, 2]))
    causal = draw(st.booleans())
    window = draw(st.none() | st.sampled_from([1, 5])) if causal else None
    seg = _segments(draw, B, T)
    if not causal and seg is None:
        causal = True  # something must be masked
    positions = sorted(set(draw(st.lists(st.integers(0, T - 1), min_size=1, max_size=3))))
    whole = draw(st.booleans())
    ks = jax.random.split(jax.random.key(testing.fresh_seed()), 3)
    q = jax.random.normal(ks[0], (B, T, 2, 8))
    k = jax.random.normal(ks[1], (B, T, Hkv, 8))
    v = jax.random.normal(ks[2], (B, T, Hkv, 8))
    kw = dict(causal=causal)
    if window is not None:
        kw["local_window_size"] = (window, 0)
    segment_ids = None if seg is None else jnp.asarray(seg)
    bad_v = _inject(v, positions, value, whole)
    out = _jit(attention, implementation=impl, **kw)(q, k, bad_v, segment_ids=segment_ids)
    ref = _jit(attention, implementation="naive", **kw)(q, k, v, segment_ids=segment_ids)
    sees = visible(
        jnp.arange(T),
        jnp.arange(T),
        causal=causal,
        window=(window, 0) if window is not None else (None, None),
        q_segment_ids=segment_ids,
        k_segment_ids=segment_ids,
    )
    sees = np.broadcast_to(np.asarray(sees), (B, T, T))
    _compare(out, ref, sees[:, :, positions].any(-1), f"attention {impl}")


@pytest.mark.parametrize("impl", IMPLS)
@FEW
@given(data=st.data(), value=BAD)
def test_decode_attention_cache_past_lengths(impl, data, value):
    draw = data.draw
    B, S, Hkv = 3, draw(st.sampled_from([5, 24])), draw(st.sampled_from([1, 2]))
    lengths = np.asarray(draw(st.lists(st.integers(0, S), min_size=B, max_size=B)), np.int32)
    ks = jax.random.split(jax.random.key(testing.fresh_seed()), 3)
    q = jax.random.normal(ks[0], (B, 2, 16))  # head dim 16: the Triton decoder's least
    k = np.array(jax.random.normal(ks[1], (B, S, Hkv, 16)))
    v = np.array(jax.random.normal(ks[2], (B, S, Hkv, 16)))
    bad_k, bad_v = k.copy(), v.copy()
    for b, n in enumerate(lengths):
        bad_k[b, n:] = value
        bad_v[b, n:] = value
    lengths = jnp.asarray(lengths)
    out = _jit(decode_attention, implementation=impl)(q, bad_k, bad_v, lengths)
    ref = _jit(decode_attention, implementation="naive")(q, k, v, lengths)
    testing.assert_close(out, ref, 1e-5, f"decode_attention {impl}")


def _recurrent_inputs(draw, op: str):
    B, T, K, V = 2, draw(st.sampled_from([13, 40])), 8, 4
    Hqk = draw(st.sampled_from([1, 2]))
    ks = jax.random.split(jax.random.key(testing.fresh_seed()), 6)
    q = jax.random.normal(ks[0], (B, T, Hqk, K))
    k = jax.random.normal(ks[1], (B, T, Hqk, K))
    v = jax.random.normal(ks[2], (B, T, 2, V))
    decay = draw(st.sampled_from(["none", "scalar", "channel"] if op == "la" else ["scalar"]))
    g = None
    if decay != "none":
        shape = (B, T, 2) if decay == "scalar" else (B, T, 2, K)
        g = jax.random.uniform(ks[3], shape, jnp.float32, -1.0, 0.0)
    s0 = jax.random.normal(ks[4], (B, 2, K, V))
    seg = _segments(draw, B, T)
    positions = sorted(set(draw(st.lists(st.integers(0, T - 1), min_size=1, max_size=2))))
    where = draw(st.sampled_from(["k", "v"]))
    chunk = draw(st.sampled_from([8, 16]))
    return q, k, v, g, s0, seg, positions, where, chunk, ks[5]


@pytest.mark.parametrize("impl", IMPLS)
@FEW
@given(data=st.data(), value=BAD)
def test_linear_attention_values_at_later_or_other_segment_tokens(impl, data, value):
    q, k, v, g, s0, seg, positions, where, chunk, _ = _recurrent_inputs(data.draw, "la")
    whole = data.draw(st.booleans())
    bad_k = _inject(k, positions, value, whole) if where == "k" else k
    bad_v = _inject(v, positions, value, whole) if where == "v" else v
    kw = dict(initial_state=s0, segment_ids=None if seg is None else jnp.asarray(seg))
    run = _jit(linear_attention, chunk_size=chunk, implementation=impl)
    out = run(q, bad_k, bad_v, g, **kw)
    ref = run(q, k, v, g, **kw)
    _compare(out, ref, _reached(q.shape[1], positions, seg), f"linear_attention {impl}")


@pytest.mark.parametrize("impl", IMPLS)
@FEW
@given(data=st.data(), value=BAD)
def test_gated_delta_rule_values_at_later_or_other_segment_tokens(impl, data, value):
    q, k, v, g, s0, seg, positions, where, chunk, key = _recurrent_inputs(data.draw, "dr")
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    beta = jax.random.uniform(key, v.shape[:3])
    whole = data.draw(st.booleans())
    bad_k = _inject(k, positions, value, whole) if where == "k" else k
    bad_v = _inject(v, positions, value, whole) if where == "v" else v
    kw = dict(initial_state=s0, segment_ids=None if seg is None else jnp.asarray(seg))
    run = _jit(gated_delta_rule, chunk_size=chunk, implementation=impl)
    out = run(q, bad_k, bad_v, beta, g, **kw)
    ref = run(q, k, v, beta, g, **kw)
    _compare(out, ref, _reached(q.shape[1], positions, seg), f"gated_delta_rule {impl}")


def _as_given(op: str, impl: str):
    """The kernel of ``op`` in ``impl`` without its NaN handling (the function that
    ``masks_nonfinite_if_poisoned`` wraps)."""
    package = {"linear_attention": "linear_attention", "gated_delta_rule": "delta_rule"}[op]
    module = importlib.import_module(f"seqmix.kernels.{package}.{impl.removeprefix('pallas_')}")
    return getattr(module, op).__wrapped__


@pytest.mark.parametrize("impl", ["pallas_triton", "pallas_tpu"])
@pytest.mark.parametrize("op", ["linear_attention", "gated_delta_rule"])
@FEW
@given(data=st.data(), value=BAD)
def test_a_bad_token_poisons_the_kernels_final_state(op, impl, data, value):
    """The premise of the kernels' fast path (``masks_nonfinite_if_poisoned``): without
    packed runs, a NaN or Inf anywhere in k, v (or beta) leaves the final state that the
    kernel computes on the inputs as given non-finite, so a finite one proves them clean."""
    q, k, v, g, s0, _, positions, where, chunk, key = _recurrent_inputs(
        data.draw, "la" if op == "linear_attention" else "dr"
    )
    whole = data.draw(st.booleans())
    args = {"q": q, "k": k, "v": v}
    if op == "gated_delta_rule":
        args["k"] = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
        args["beta"] = jax.random.uniform(key, v.shape[:3])
        where = data.draw(st.sampled_from(["k", "v", "beta"]))
    args[where] = _inject(args[where], positions, value, whole)
    kernel = functools.partial(
        _as_given(op, impl), scale=0.5, runs=None, chunk_size=chunk, initial_state=s0
    )
    with interpret():
        try:
            _, final = jax.jit(kernel)(*args.values(), g)
        except NotImplementedError:  # a chunk size the kernel does not serve
            assume(False)
    final = np.asarray(final).reshape(final.shape[0], -1)
    assert not np.all(np.isfinite(final), axis=-1).any(), (
        f"{op} {impl}: a bad {where} at {positions} left a final state finite"
    )
