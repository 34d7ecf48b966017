"""attention(implementation="pallas_tpu") against the naive oracle (TPU interpret mode with race
detection), and lowering of forward + backward for a real TPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqmix import testing
from seqmix.kernels import attention, interpret
from seqmix.kernels.attention import tpu


def _inputs(seed, B, T, S, H, Hkv, D, dtype, segments=False):
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (B, T, H, D), jnp.float32).astype(dtype)
    k = jax.random.normal(ks[1], (B, S, Hkv, D), jnp.float32).astype(dtype)
    v = jax.random.normal(ks[2], (B, S, Hkv, D), jnp.float32).astype(dtype)
    seg = None
    if segments:  # packed sequences of random lengths
        seg = jnp.sort(jax.random.randint(ks[3], (B, T), 0, 3), axis=1)
    return q, k, v, seg


CASES = {
    # B, T, S, H, Hkv, D, causal, window, segments, softcap, dtype
    "T1": (1, 1, 1, 2, 1, 128, True, None, False, None, jnp.float32),
    "causal_softcap_gqa_T17": (1, 17, 17, 4, 2, 128, True, None, False, 5.0, jnp.bfloat16),
    "gqa_window_segments_T200": (2, 200, 200, 2, 1, 128, True, 70, True, None, jnp.bfloat16),
    "two_sided_window_D64_T!=S_softcap": (
        1,
        200,
        300,
        2,
        1,
        64,
        False,
        (100, 30),
        False,
        5.0,
        jnp.float32,
    ),
    "mqa_full_fp16": (1, 200, 200, 4, 1, 128, False, None, False, None, jnp.float16),
    "D256_segments_noncausal": (1, 17, 17, 2, 2, 256, False, None, True, None, jnp.float32),
    # rows t >= 155 see no key: o = 0, lse = -inf, finite gradients; whole q blocks see none
    "rows_without_keys": (1, 200, 150, 2, 1, 128, False, (5, 0), False, None, jnp.float32),
}


# T = 1: p = 1, so dq and dk are dlse * k * scale (resp. q) plus do.v - do.o, which cancels to
# float32 roundoff of |do| |v| (~1e-5 of it). When the random dlse is small the relative
# error grows as 1 / |dlse|: 1.1e-4 for seed 1528244447 (|dlse| = 0.04, a CI run), 1e-5 to
# 1.5e-5 for 2 of 29 other seeds. 5e-4 fails only for |dlse| < ~0.01 (p ~ 5e-5).
GRAD_TOL = {"T1": 5e-4}


@pytest.mark.parametrize("name", list(CASES))
def test_pallas_tpu_matches_naive(name, capsys):
    B, T, S, H, Hkv, D, causal, window, segments, softcap, dtype = CASES[name]
    seed = testing.fresh_seed()
    q, k, v, seg = _inputs(seed, B, T, S, H, Hkv, D, dtype, segments)
    kw = dict(
        causal=causal, local_window_size=window, segment_ids=seg, softcap=softcap, return_lse=True
    )
    with interpret():
        testing.check_against(
            jax.jit(lambda q, k, v: attention(q, k, v, implementation="pallas_tpu", **kw)),
            jax.jit(lambda q, k, v: attention(q, k, v, implementation="naive", **kw)),
            (q, k, v),
            argnums=(0, 1, 2),
            tol=testing.tolerance(dtype),
            grad_tol=GRAD_TOL.get(name),
            seed=seed,
            names="qkv",
        )
    assert "RACE DETECTED" not in capsys.readouterr().out


def test_rows_without_keys_are_zero_with_minus_inf_lse():
    q, k, v, _ = _inputs(0, 1, 200, 150, 2, 1, 128, jnp.float32)
    with interpret():
        o, lse = attention(
            q, k, v, local_window_size=(5, 0), return_lse=True, implementation="pallas_tpu"
        )
    assert np.all(np.asarray(o[:, 155:]) == 0) and np.all(np.isneginf(lse[:, 155:]))
    assert np.all(np.isfinite(lse[:, :155]))


def _cfg(T, bq, bk, causal=False, window=(None, None)):
    left, right = window
    return tpu._Cfg(
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
    assert tpu._kv_steps(full) == 64 and tpu._q_steps(full) == 64
    assert tpu._kv_steps(causal) == 64  # later steps of early rows are skipped, not fetched
    assert tpu._kv_steps(window) == 3 and tpu._q_steps(window) == 3
    # every visible (q, k) pair is inside the iterated band, nothing outside it is visible
    c = _cfg(4096, 256, 512, window=(700, 300))
    nkv = tpu._kv_steps(c)
    for i in range(c.nq):
        lo, hi = tpu._kv_range(i, c)
        assert hi - lo + 1 <= nkv
        for j in range(c.nk):
            qs, ks = np.arange(i * 256, i * 256 + 256), np.arange(j * 512, j * 512 + 512)
            d = qs[:, None] - ks[None, :]
            any_visible = np.any((d <= 700) & (d >= -300))
            assert any_visible == (lo <= j <= hi), (i, j)
            fully = np.all((d <= 700) & (d >= -300))
            assert bool(tpu._needs_mask(i, j, c)) == (not fully), (i, j)


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
