"""attention / decode_attention(implementation="cudnn"): what it refuses, and why.

cuDNN cannot run on the CPU; these tests check that unsupported arguments raise
NotImplementedError naming the reason (before anything reaches jax), and that asking for
cudnn on a machine without a GPU raises NotImplementedError through dispatch."""

import jax.numpy as jnp
import pytest

from seqmix.kernels import attention, decode_attention
from seqmix.kernels.attention import cudnn


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
