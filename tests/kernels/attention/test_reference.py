"""The attention oracle and the XLA form: the oracle against a transcription of the
definition, the XLA form's key blocks, rows that see no key, decoding against full
attention, and no overflow at T = 4096."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqmix import testing
from seqmix.kernels import attention, decode_attention
from seqmix.kernels.attention import reference

from .cases import Case, DecodeCase, decode_inputs, inputs


def _qkv(seed, B, T, S, H, Hkv, D, dtype="float32", segments=None):
    return inputs(Case("", B, T, S, H, Hkv, D, dtype, segments=segments), seed)


def test_xla_multiple_key_blocks_odd_length():
    seed = testing.fresh_seed()
    q, k, v, seg = _qkv(seed, 2, 203, 203, 4, 2, 16, segments="sorted")
    kw = dict(causal=True, window=(40, 0), segment_ids=seg, softcap=20.0, scale=0.3)
    testing.check_against(
        lambda q, k, v: reference.attention_xla(q, k, v, block_k=64, **kw),
        lambda q, k, v: reference.attention_naive(q, k, v, **kw),
        (q, k, v),
        argnums=(0, 1, 2),
        tol=1e-5,
        seed=seed,
    )


def test_naive_matches_explicit_softmax():
    """The oracle itself against a direct transcription of the definition."""
    seed = testing.fresh_seed()
    q, k, v, _ = _qkv(seed, 1, 9, 9, 4, 2, 8)
    o = attention(q, k, v, causal=True, local_window_size=3, implementation="naive")
    kk = jnp.repeat(k, 2, axis=2)
    vv = jnp.repeat(v, 2, axis=2)
    expected = np.zeros(q.shape, np.float32)
    for h in range(4):
        for t in range(9):
            keys = [s for s in range(9) if t - 3 <= s <= t]
            logits = np.array([np.dot(q[0, t, h], kk[0, s, h]) / np.sqrt(8) for s in keys])
            w = np.exp(logits - logits.max())
            w /= w.sum()
            expected[0, t, h] = sum(wi * np.asarray(vv[0, s, h]) for wi, s in zip(w, keys))
    testing.assert_close(o, expected, 1e-5)


def test_row_without_visible_keys_is_zero_with_minus_inf_lse():
    q, k, v, _ = _qkv(0, 1, 4, 8, 2, 2, 8)
    # window (0, 0) with T != S: query t sees only key t; keys 4..7 unseen, all rows see one key
    o, lse = attention(q, k, v, local_window_size=(0, 0), return_lse=True, implementation="xla")
    assert np.all(np.isfinite(lse))
    # a window that points past the keys: query 3 of a (0,0) window over 2 keys sees nothing
    o, lse = attention(
        q, k[:, :2], v[:, :2], local_window_size=(0, 0), return_lse=True, implementation="xla"
    )
    assert np.all(np.asarray(o[:, 2:]) == 0) and np.all(np.isneginf(lse[:, 2:]))
    g = jax.grad(
        lambda q: attention(
            q, k[:, :2], v[:, :2], local_window_size=(0, 0), implementation="xla"
        ).sum()
    )(q)
    assert np.all(np.isfinite(g))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("impl", ["naive", "xla"])
def test_decode_equals_last_row_of_full_attention(impl, dtype):
    seed = testing.fresh_seed()
    B, S, H, Hkv, D = 3, 37, 8, 2, 16
    q, k, v, _ = _qkv(seed, B, S, S, H, Hkv, D, dtype)
    lengths = jnp.array([37, 20, 1])
    o = decode_attention(q[:, -1], k, v, lengths, softcap=30.0, implementation=impl)
    for b, n in enumerate([37, 20, 1]):
        full = attention(
            q[b : b + 1, :n],
            k[b : b + 1, :n],
            v[b : b + 1, :n],
            causal=True,
            softcap=30.0,
            implementation="naive",
        )
        row = attention(
            q[b : b + 1, -1:],
            k[b : b + 1, :n],
            v[b : b + 1, :n],
            softcap=30.0,
            implementation="naive",
        )
        testing.assert_close(o[b : b + 1], row[:, 0], testing.tolerance(dtype))
        if n == S:
            testing.assert_close(o[b : b + 1], full[:, -1], testing.tolerance(dtype))


def test_a_row_of_length_zero_decodes_to_zero():
    q, k, v, lengths = decode_inputs(DecodeCase("", 2, 16, 4, 1, 8, "float32", None, (16, 0)), 0)
    o = decode_attention(q, k, v, lengths)
    assert np.all(np.asarray(o[1]) == 0) and np.any(np.asarray(o[0]) != 0)


def test_long_sequence_float32_no_overflow():
    seed = testing.fresh_seed()
    q, k, v, _ = _qkv(seed, 1, 4096, 4096, 1, 1, 16)
    q = q * 4.0  # large logits
    o = attention(q, k, v, causal=True, implementation="xla")
    ref = attention(q, k, v, causal=True, implementation="naive")
    testing.assert_close(o, ref, 1e-5)
