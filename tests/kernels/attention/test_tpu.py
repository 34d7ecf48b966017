"""attention and decode_attention, implementation="pallas_tpu": rows that see no key, the
block-sparse iteration space, and lowering of forward + backward for a real TPU (nothing
runs)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqmix import testing
from seqmix.kernels import attention, interpret
from seqmix.kernels.attention import tpu
from seqmix.kernels.attention.tpu import blocks

from .cases import Case, inputs


def test_rows_without_keys_are_zero_with_minus_inf_lse():
    q, k, v, _ = inputs(Case("", 1, 200, 150, 2, 1, 128, "float32"), 0)
    with interpret():
        o, lse = attention(
            q, k, v, local_window_size=(5, 0), return_lse=True, implementation="pallas_tpu"
        )
    assert np.all(np.asarray(o[:, 155:]) == 0) and np.all(np.isneginf(lse[:, 155:]))
    assert np.all(np.isfinite(lse[:, :155]))


def _cfg(T, bq, bk, causal=False, window=(None, None)):
    left, right = window
    return blocks.Cfg(
        B=1,
        T=T,
        S=T,
        H=1,
        Hkv=1,
        D=128,
        Dp=128,
        Tp=T,
        Sp=T,
        bq=bq,
        bk=bk,
        causal=causal,
        left=left,
        right=0 if causal else right,
        softcap=None,
        scale=1.0,
        has_seg=False,
        dtype="bfloat16",
        compute_dtype="bfloat16",
        interpret=False,
    )


def test_block_sparse_iteration_space():
    """The KV grid axis has as many steps as the widest band of visible blocks: a 1k window
    at T = 32k runs 3 of 64 blocks per query block (>= 5x less work than causal)."""
    full = _cfg(32768, 512, 512)
    causal = _cfg(32768, 512, 512, causal=True)
    window = _cfg(32768, 512, 512, causal=True, window=(1024, None))
    assert blocks.kv_steps(full) == 64 and blocks.q_steps(full) == 64
    assert blocks.kv_steps(causal) == 64  # later steps of early rows are skipped, not fetched
    assert blocks.kv_steps(window) == 3 and blocks.q_steps(window) == 3
    # every visible (q, k) pair is inside the iterated band, nothing outside it is visible
    c = _cfg(4096, 256, 512, window=(700, 300))
    nkv = blocks.kv_steps(c)
    for i in range(c.nq):
        lo, hi = blocks.kv_range(i, c)
        assert hi - lo + 1 <= nkv
        for j in range(c.nk):
            qs, ks = np.arange(i * 256, i * 256 + 256), np.arange(j * 512, j * 512 + 512)
            d = qs[:, None] - ks[None, :]
            any_visible = np.any((d <= 700) & (d >= -300))
            assert any_visible == (lo <= j <= hi), (i, j)
            fully = np.all((d <= 700) & (d >= -300))
            assert bool(blocks.needs_mask(i, j, c)) == (not fully), (i, j)


@pytest.mark.parametrize(
    "dtype, D, window, segments",
    [
        (jnp.bfloat16, 128, (1000, 0), True),
        (jnp.bfloat16, 128, None, False),
        (jnp.float32, 64, (300, 300), False),
        (jnp.bfloat16, 256, None, True),
    ],
)
def test_lowers_for_tpu_forward_and_backward(dtype, D, window, segments):
    """Mosaic lowering of forward, dQ and dK/dV at T = 2048 with the real block table."""
    B, T, H, Hkv = 1, 2048, 8, 2
    q = jnp.zeros((B, T, H, D), dtype)
    k = jnp.zeros((B, T, Hkv, D), dtype)
    seg = jnp.zeros((B, T), jnp.int32) if segments else None

    def loss_and_grads(q, k, v):
        def f(q, k, v):
            o, lse = tpu.attention(
                q,
                k,
                v,
                causal=True,
                window=window or (None, None),
                segment_ids=seg,
                softcap=30.0,
                scale=D**-0.5,
                return_lse=True,
            )
            return o.astype(jnp.float32).sum() + lse.sum()

        return jax.value_and_grad(f, argnums=(0, 1, 2))(q, k, v)

    text = testing.lower_for(loss_and_grads, q, k, k, platform="tpu")
    assert text.count("tpu_custom_call") == 3  # forward, dQ, dK/dV


def _cache(S, dtype=jnp.bfloat16, B=4, H=32, Hkv=8, D=128):
    return (
        jnp.zeros((B, H, D), dtype),
        jnp.zeros((B, S, Hkv, D), dtype),
        jnp.zeros((B,), jnp.int32),
    )


def test_decode_lowers_at_128k_and_with_gradients():
    """A 128k cache, and fp16 / fp32, MQA, D = 64 and 256 with the custom_vjp backward."""
    q, k, lengths = _cache(131072)
    text = testing.lower_for(
        lambda q, k, v, n: tpu.decode_attention(q, k, v, n, scale=128**-0.5, softcap=30.0),
        q,
        k,
        k,
        lengths,
        platform="tpu",
    )
    assert "tpu_custom_call" in text
    for dtype, H, Hkv, D in [(jnp.float16, 8, 1, 64), (jnp.float32, 4, 4, 256)]:
        q, k, lengths = _cache(4096, dtype, B=2, H=H, Hkv=Hkv, D=D)
        grads = jax.grad(
            lambda q, k, v, n: (
                tpu.decode_attention(q, k, v, n, scale=0.1, softcap=None).astype(jnp.float32).sum()
            ),
            argnums=(0, 1, 2),
        )
        testing.lower_for(grads, q, k, k, lengths, platform="tpu")
