"""decode_attention(implementation="pallas_triton" | "pallas_tpu") against the naive oracle
(interpret mode), and lowering at a 128k-token cache for an H200 and a TPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqmix import testing
from seqmix.kernels import decode_attention, interpret
from seqmix.kernels.attention import decode, tuning

IMPLS = ["pallas_triton", "pallas_tpu"]


def _inputs(seed, B, S, H, Hkv, D, dtype):
    ks = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(ks[0], (B, H, D), jnp.float32).astype(dtype)
    k = jax.random.normal(ks[1], (B, S, Hkv, D), jnp.float32).astype(dtype)
    v = jax.random.normal(ks[2], (B, S, Hkv, D), jnp.float32).astype(dtype)
    return q, k, v


CASES = {
    # B, S, H, Hkv, D, dtype, softcap, lengths; S is not a multiple of any block
    "gqa4_lengths_0_1_S_odd_fp32": (4, 300, 8, 2, 64, jnp.float32, None, [0, 1, 300, 157]),
    "mqa_softcap_bf16": (3, 200, 4, 1, 128, jnp.bfloat16, 20.0, [200, 37, 129]),
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", list(CASES))
def test_decode_matches_naive(name, impl, capsys):
    """Outputs and (through the xla reference's VJP) gradients in q, k_cache, v_cache."""
    B, S, H, Hkv, D, dtype, softcap, lengths = CASES[name]
    seed = testing.fresh_seed()
    q, k, v = _inputs(seed, B, S, H, Hkv, D, dtype)
    lengths = jnp.array(lengths, jnp.int32)
    with interpret():
        testing.check_against(
            jax.jit(
                lambda q, k, v: decode_attention(
                    q, k, v, lengths, softcap=softcap, implementation=impl
                )
            ),
            jax.jit(
                lambda q, k, v: decode_attention(
                    q, k, v, lengths, softcap=softcap, implementation="naive"
                )
            ),
            (q, k, v),
            argnums=(0, 1, 2),
            tol=testing.tolerance(dtype),
            seed=seed,
            names=["q", "k_cache", "v_cache"],
        )
    assert "RACE DETECTED" not in capsys.readouterr().out


@pytest.mark.parametrize("impl", IMPLS)
def test_decode_ignores_cache_past_length(impl):
    """Entries past a row's length (NaN here) are never used; a row of length 0 gives 0."""
    seed = testing.fresh_seed()
    B, S, H, Hkv, D = 3, 290, 8, 4, 128  # TPU: two programs of 2 KV heads each
    q, k, v = _inputs(seed, B, S, H, Hkv, D, jnp.bfloat16)
    lengths = jnp.array([0, 131, 290], jnp.int32)
    past = jnp.arange(S)[None, :, None, None] >= lengths[:, None, None, None]
    k_nan, v_nan = jnp.where(past, jnp.nan, k), jnp.where(past, jnp.nan, v)
    with interpret():
        o = decode_attention(q, k_nan, v_nan, lengths, implementation=impl)
    ref = decode_attention(q, k, v, lengths, implementation="naive")
    testing.assert_close(o, ref, testing.tolerance(jnp.bfloat16))
    assert np.all(np.asarray(o[0], np.float32) == 0)


def test_gpu_splits_fill_an_h200():
    """B = 4, Hkv = 8, 128k cache: >= 4 programs per SM, each split >= 16 key blocks."""
    bk = tuning.attention_blocks(128, jnp.bfloat16, "NVIDIA H200", "decode").block_k
    keys = decode.KEYS_PER_SPLIT
    n = decode.gpu_num_splits(4, 8, 131072, bk, keys, 132)
    assert 4 * 8 * n >= 4 * 132
    assert 131072 // n >= 16 * bk
    # a short cache never gets more splits than key blocks; a 1M cache stays bounded
    assert decode.gpu_num_splits(1, 1, 300, bk, keys, 132) == -(-300 // bk)
    assert decode.gpu_num_splits(4, 8, 1 << 20, bk, keys, 132) <= decode.MAX_SPLITS


def _cache(S, dtype=jnp.bfloat16, B=4, H=32, Hkv=8, D=128):
    return (
        jnp.zeros((B, H, D), dtype),
        jnp.zeros((B, S, Hkv, D), dtype),
        jnp.zeros((B,), jnp.int32),
    )


@pytest.mark.parametrize(
    "platform, fn", [("cuda", decode.decode_attention_triton), ("tpu", decode.decode_attention_tpu)]
)
def test_decode_lowers_at_128k(platform, fn):
    q, k, lengths = _cache(131072)
    text = testing.lower_for(
        lambda q, k, v, n: fn(q, k, v, n, scale=128**-0.5, softcap=30.0),
        q,
        k,
        k,
        lengths,
        platform=platform,
    )
    assert ("__gpu$xla.gpu.triton" if platform == "cuda" else "tpu_custom_call") in text


@pytest.mark.parametrize(
    "platform, fn", [("cuda", decode.decode_attention_triton), ("tpu", decode.decode_attention_tpu)]
)
def test_decode_lowers_with_gradient_and_other_dtypes(platform, fn):
    """fp16 / fp32, MQA, D = 64 and 256, and the custom_vjp backward, at a 4k cache."""
    for dtype, H, Hkv, D in [(jnp.float16, 8, 1, 64), (jnp.float32, 4, 4, 256)]:
        q, k, lengths = _cache(4096, dtype, B=2, H=H, Hkv=Hkv, D=D)
        grads = jax.grad(
            lambda q, k, v, n: fn(q, k, v, n, scale=0.1, softcap=None).astype(jnp.float32).sum(),
            argnums=(0, 1, 2),
        )
        testing.lower_for(grads, q, k, k, lengths, platform=platform)
