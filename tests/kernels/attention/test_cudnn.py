"""attention / decode_attention(implementation="cudnn"): what it refuses, and why.

cuDNN cannot run on the CPU; these tests check that unsupported arguments raise
NotImplementedError naming the reason (before anything reaches jax), and that asking for
cudnn on a machine without a GPU raises NotImplementedError through dispatch; and, with
jax's XLA attention standing in for cuDNN, that a NaN or Inf at a masked key never reaches
an output."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqmix import testing
from seqmix.kernels import attention, decode_attention
from seqmix.kernels.attention import cudnn
from seqmix.kernels.attention.reference import visible


def _qkv(T=8, S=8, H=4, Hkv=2, D=64, dtype=jnp.bfloat16):
    return (
        jnp.zeros((1, T, H, D), dtype),
        jnp.zeros((1, S, Hkv, D), dtype),
        jnp.zeros((1, S, Hkv, D), dtype),
    )


BASE = dict(
    causal=False, window=(None, None), segment_ids=None, softcap=None, scale=0.125, return_lse=False
)


@pytest.mark.parametrize(
    "change, qkv, reason",
    [
        ({}, dict(dtype=jnp.float32), "bfloat16 or float16"),
        ({}, dict(D=12), "multiple of 8"),
        ({}, dict(D=512), "multiple of 8 and <= "),
        (dict(softcap=30.0), {}, "softcap"),
        (dict(return_lse=True), {}, "log-sum-exp"),
        (dict(segment_ids=jnp.zeros((1, 8), jnp.int32)), {}, "segment_ids"),
        (dict(window=(3, 2)), {}, "causal windows"),
        (dict(window=(3, None)), {}, "causal windows"),
        (dict(causal=True, window=(None, 0)), dict(T=4), "T == S"),
    ],
)
def test_attention_refuses(change, qkv, reason):
    with pytest.raises(NotImplementedError, match=reason):
        cudnn.attention(*_qkv(**qkv), **{**BASE, **change})


@pytest.mark.parametrize(
    "kw, dtype, reason",
    [
        (dict(softcap=5.0), jnp.bfloat16, "softcap"),
        ({}, jnp.float32, "bfloat16 or float16"),
    ],
)
def test_decode_refuses(kw, dtype, reason):
    q = jnp.zeros((2, 4, 64), dtype)
    kv = jnp.zeros((2, 16, 2, 64), dtype)
    with pytest.raises(NotImplementedError, match=reason):
        cudnn.decode_attention(
            q, kv, kv, jnp.array([3, 16]), scale=0.125, **{"softcap": None, **kw}
        )


def test_needs_a_gpu_through_dispatch():
    q, k, v = _qkv()
    with pytest.raises(NotImplementedError, match="needs a GPU"):
        attention(q, k, v, causal=True, implementation="cudnn")
    with pytest.raises(NotImplementedError, match="needs a GPU"):
        decode_attention(q[:, 0], k, v, jnp.array([5]), implementation="cudnn")


@pytest.fixture
def cudnn_as_xla(monkeypatch):
    """cudnn's wrappers run on the CPU with jax's XLA attention in cuDNN's place: it weighs
    a masked key by 0 as cuDNN does (0 times NaN is NaN), so the wrappers' exact masking is
    what these tests see."""
    real = jax.nn.dot_product_attention

    def xla(*args, implementation=None, **kwargs):
        assert implementation == "cudnn"
        return real(*args, implementation="xla", **kwargs)

    monkeypatch.setattr(cudnn, "_gpus", lambda: ["gpu"])
    monkeypatch.setattr(jax.nn, "dot_product_attention", xla)


@pytest.mark.parametrize(
    "mask", [dict(causal=True), dict(causal=True, local_window_size=(5, 0)), dict()]
)
def test_values_at_masked_keys_never_reach_an_output(cudnn_as_xla, mask):
    _check_masked_keys(mask)


@pytest.mark.gpu
@pytest.mark.skipif(not cudnn._gpus(), reason="cuDNN itself: needs a GPU")
@pytest.mark.parametrize("mask", [dict(causal=True), dict(causal=True, local_window_size=(5, 0))])
def test_cudnn_itself_never_passes_a_masked_key(mask):
    _served(_check_masked_keys, mask)


def _served(check, *args):
    try:
        check(*args)
    except NotImplementedError as e:  # shapes this cuDNN does not take
        pytest.skip(f"not served: {e}")


def _check_masked_keys(mask):
    """Outputs and the gradients of a loss on the rows that attend no bad key."""
    B, T, H, Hkv, D = 2, 64, 4, 2, 16
    ks = jax.random.split(jax.random.key(testing.fresh_seed()), 3)
    q, k, v = (
        jax.random.normal(kk, (B, T, h, D), jnp.bfloat16) for kk, h in zip(ks, (H, Hkv, Hkv))
    )
    bad_k = k.at[:, 23, 0, 3].set(jnp.inf)  # kv head 0 only
    bad_v = v.at[:, 7, 1].set(jnp.nan).at[:, 31, 0, 0].set(-jnp.inf)
    causal, window = mask.get("causal", False), mask.get("local_window_size", (None, None))
    norm = dict(segment_ids=None, softcap=None, scale=D**-0.5, return_lse=False)  # api's form
    norm.update(causal=causal, window=(window[0], 0) if causal else window)
    out, _ = cudnn.attention(q, bad_k, bad_v, **norm)
    ref = attention(q, k, v, implementation="naive", **mask)
    sees = visible(jnp.arange(T), jnp.arange(T), causal=causal, window=window)
    hit = np.zeros((T, H), bool)  # query heads 0-1 read kv head 0, 2-3 kv head 1
    for key, kv_head in ((23, 0), (7, 1), (31, 0)):
        hit[:, 2 * kv_head : 2 * kv_head + 2] |= np.asarray(sees[:, key])[:, None]
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    testing.assert_close(out[:, ~hit], ref[:, ~hit], 2e-2, "rows that attend no bad key")
    assert np.all(np.isnan(out[:, hit])), "a row that attends a non-finite key"

    def loss(q, k, v):
        o = cudnn.attention(q, k, v, **norm)[0].astype(jnp.float32)
        return jnp.sum(jnp.where(jnp.asarray(~hit)[None, :, :, None], o, 0.0) ** 2)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    for name, d, r in zip("qkv", grad(q, bad_k, bad_v), grad(q, k, v)):
        testing.assert_close(d, r, 2e-2, f"d{name} of a loss on the clean rows")


def test_decode_cache_past_lengths_never_reaches_an_output(cudnn_as_xla):
    _check_decode_past_lengths()


@pytest.mark.gpu
@pytest.mark.skipif(not cudnn._gpus(), reason="cuDNN itself: needs a GPU")
def test_cudnn_itself_never_reads_the_cache_past_lengths():
    _served(_check_decode_past_lengths)


def _check_decode_past_lengths():
    B, S, H, Hkv, D = 3, 128, 4, 2, 16
    ks = jax.random.split(jax.random.key(testing.fresh_seed()), 3)
    q = jax.random.normal(ks[0], (B, H, D), jnp.bfloat16)
    k, v = (jax.random.normal(kk, (B, S, Hkv, D), jnp.bfloat16) for kk in ks[1:])
    lengths = jnp.array([10, 128, 0])
    # stale NaN/Inf past each row's length; row 1 holds a NaN value at slot 4 of kv head 1
    bad_k = k.at[0, 15:].set(jnp.inf).at[2].set(jnp.nan)
    bad_v = v.at[0, 10].set(jnp.nan).at[1, 4, 1, 2].set(jnp.nan)
    out = np.asarray(cudnn.decode_attention(q, bad_k, bad_v, lengths, scale=D**-0.5, softcap=None))
    out = out.astype(np.float32)
    ref = np.asarray(decode_attention(q, k, v, lengths, implementation="naive"), np.float32)
    testing.assert_close(out[0], ref[0], 2e-2, "row 0: stale entries past its length")
    testing.assert_close(out[1, :2], ref[1, :2], 2e-2, "row 1: the heads of clean kv head 0")
    assert np.all(np.isnan(out[1, 2:])), "row 1: the heads that attend the NaN slot"
    np.testing.assert_array_equal(out[2], 0.0)
