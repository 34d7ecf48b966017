"""attention(implementation="pallas_triton"): interpret mode against the naive oracle, the
block table, block sparsity, and lowering for an H200 (forward and backward)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqmix import testing
from seqmix.kernels import attention, interpret
from seqmix.kernels.attention import reference, triton, tuning


def _inputs(seed, B, T, S, H, Hkv, D, dtype, segments=None):
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (B, T, H, D), jnp.float32).astype(dtype)
    k = jax.random.normal(ks[1], (B, S, Hkv, D), jnp.float32).astype(dtype)
    v = jax.random.normal(ks[2], (B, S, Hkv, D), jnp.float32).astype(dtype)
    seg = None
    if segments == "sorted":  # packed sequences of random lengths
        seg = jnp.sort(jax.random.randint(ks[3], (B, T), 0, 4), axis=1)
    elif segments == "random":  # ids in any order: blocks are masked, not skipped
        seg = jax.random.randint(ks[3], (B, T), 0, 3)
    return q, k, v, seg


def _check(case, dtype, tol=None):
    B, T, S, H, Hkv, D, causal, window, segments, softcap = case
    seed = testing.fresh_seed()
    q, k, v, seg = _inputs(seed, B, T, S, H, Hkv, D, dtype, segments)
    kw = dict(
        causal=causal, local_window_size=window, segment_ids=seg, softcap=softcap, return_lse=True
    )
    with interpret():
        testing.check_against(
            lambda q, k, v: attention(q, k, v, implementation="pallas_triton", **kw),
            lambda q, k, v: attention(q, k, v, implementation="naive", **kw),
            (q, k, v),
            argnums=(0, 1, 2),
            tol=tol or testing.tolerance(dtype),
            seed=seed,
            names="qkv",
        )


CASES = [
    # B, T, S, H, Hkv, D, causal, window, segments, softcap
    (2, 17, 17, 4, 2, 16, True, None, None, None),  # causal, GQA, T not a block multiple
    (1, 1, 1, 2, 1, 16, True, None, None, None),  # T = 1, MQA
    (2, 33, 33, 4, 4, 32, False, None, None, None),  # full attention
    (1, 200, 200, 4, 2, 16, True, 40, "sorted", None),  # GQA + window + packed segments
    (2, 29, 29, 2, 2, 16, True, None, None, 5.0),  # causal + softcap
    (1, 12, 30, 2, 1, 16, False, None, None, None),  # S > T
    (1, 30, 12, 2, 1, 16, True, (4, 0), None, None),  # S < T: rows that see no key
    (1, 40, 40, 4, 2, 16, False, (7, 3), "random", None),  # two-sided window, unsorted ids
]
BF16_CASES = [CASES[i] for i in (0, 3, 4, 6)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_matches_naive_float32(case):
    _check(case, jnp.float32)


@pytest.mark.parametrize("case", BF16_CASES, ids=lambda c: "-".join(map(str, c)))
def test_matches_naive_bfloat16(case):
    _check(case, jnp.bfloat16)


def test_head_dim_64_float16():
    _check((1, 48, 48, 2, 1, 64, True, None, None, None), jnp.float16)


def test_head_dim_not_power_of_two():
    _check((1, 20, 20, 2, 1, 24, False, None, None, None), jnp.float32)


def test_rectangular_tiles_and_many_blocks():
    """Unequal tiles per kernel (32x16 forward, 16x32 dK/dV, 32x32 dQ) over many blocks, so
    that interior (unmasked) and edge blocks of every loop are exercised."""
    seed = testing.fresh_seed()
    q, k, v, _ = _inputs(seed, 1, 90, 90, 4, 2, 16, jnp.float32)
    B = tuning.Blocks
    blocks = {"fwd": B(32, 16, 4, 1), "bwd": B(16, 32, 4, 1), "bwd_dq": B(32, 32, 4, 1)}
    for window in [(20, 45), (None, 30)]:
        testing.check_against(
            lambda q, k, v: triton.flash_attention(
                q, k, v, window=window, softcap=7.0, blocks=blocks, interpret=True
            ),
            lambda q, k, v: reference.attention_naive(
                q, k, v, causal=False, window=window, segment_ids=None, softcap=7.0, scale=16**-0.5
            ),
            (q, k, v),
            argnums=(0, 1, 2),
            tol=1e-5,
            seed=seed,
            names="qkv",
        )


@pytest.mark.parametrize("D", [64, 128])
def test_the_h200_tiles_of_the_table(D):
    """The table's own Hopper tiles (not the interpreter's 16 x 16), causal with GQA and a
    length that no tile divides: the rows the H200 benchmarks ran must also be exact."""
    seed = testing.fresh_seed()
    q, k, v, _ = _inputs(seed, 1, 200, 200, 4, 2, D, jnp.float32)
    blocks = {
        kind: tuning.attention_blocks(D, jnp.bfloat16, "NVIDIA H200", kind)
        for kind in ("fwd", "bwd", "bwd_dq")
    }
    testing.check_against(
        lambda q, k, v: triton.flash_attention(
            q, k, v, window=(None, 0), blocks=blocks, interpret=True
        ),
        lambda q, k, v: reference.attention_naive(
            q, k, v, causal=True, window=(None, None), segment_ids=None, softcap=None, scale=D**-0.5
        ),
        (q, k, v),
        argnums=(0, 1, 2),
        tol=1e-5,
        seed=seed,
        names="qkv",
    )


def test_unsupported_dtype_raises():
    q = jnp.zeros((1, 4, 2, 16), jnp.float64 if jax.config.jax_enable_x64 else jnp.int8)
    with pytest.raises(NotImplementedError, match="bfloat16"):
        triton.attention(
            q,
            q,
            q,
            causal=False,
            window=(None, None),
            segment_ids=None,
            softcap=None,
            scale=1.0,
            return_lse=False,
        )


# --- block sparsity: the loops visit only the visible blocks ---------------------------------


def _visited_blocks(T, bq, bk, window):
    st = triton._Static(
        left=window[0],
        right=window[1],
        S=T,
        groups=1,
        scale=1.0,
        softcap=None,
        segments=False,
        fwd=None,
        bwd=None,
        bwd_dq=None,
        interpret=True,
        precision=None,
    )
    nq, nk = T // bq, T // bk
    fwd = sum(
        int(hi) - int(lo)
        for lo, hi, *_ in (triton._key_blocks(jnp.int32(i * bq), bq, bk, nk, st) for i in range(nq))
    )
    bwd = sum(
        int(hi) - int(lo)
        for lo, hi, *_ in (
            triton._query_blocks(jnp.int32(j * bk), bk, bq, nq, st) for j in range(nk)
        )
    )
    return fwd, bwd


def test_window_visits_few_blocks():
    """A 1k window at T = 32k visits >= 5x fewer (query, key) blocks than full causal, in
    the forward and in the dK/dV kernel."""
    T, bq, bk = 32768, 128, 64
    causal = _visited_blocks(T, bq, bk, (None, 0))
    window = _visited_blocks(T, bq, bk, (1024, 0))
    assert causal[0] == causal[1] == sum(-(-(i + 1) * bq // bk) for i in range(T // bq))
    assert causal[0] >= 5 * window[0] and causal[1] >= 5 * window[1], (causal, window)


def test_edge_blocks_are_exact_ranges():
    """Every visible block lies in [lo, hi); [flo, fhi) holds exactly the fully visible ones."""
    T, bq, bk = 256, 32, 16
    for window in [(None, 0), (40, 0), (40, 17), (None, 9), (5, None), (0, 0)]:
        st = triton._Static(
            left=window[0],
            right=window[1],
            S=T - 3,
            groups=1,
            scale=1.0,
            softcap=None,
            segments=False,
            fwd=None,
            bwd=None,
            bwd_dq=None,
            interpret=True,
            precision=None,
        )
        pos = np.arange(T)
        diff = pos[:, None] - pos[None, :]
        vis = pos[None, :] < T - 3
        if window[0] is not None:
            vis = vis & (diff <= window[0])
        if window[1] is not None:
            vis = vis & (diff >= -window[1])
        tiles = vis.reshape(T // bq, bq, T // bk, bk)
        any_, all_ = tiles.any(axis=(1, 3)), tiles.all(axis=(1, 3))
        for i in range(T // bq):
            lo, hi, flo, fhi = map(int, triton._key_blocks(jnp.int32(i * bq), bq, bk, T // bk, st))
            assert set(np.flatnonzero(any_[i])) <= set(range(lo, hi)), (window, i)
            assert set(np.flatnonzero(all_[i])) == set(range(flo, fhi)), (window, i)
        for j in range(T // bk):
            lo, hi, flo, fhi = map(
                int, triton._query_blocks(jnp.int32(j * bk), bk, bq, T // bq, st)
            )
            assert set(np.flatnonzero(any_[:, j])) <= set(range(lo, hi)), (window, j)
            assert set(np.flatnonzero(all_[:, j])) == set(range(flo, fhi)), (window, j)


# --- tile table -------------------------------------------------------------------------------


def test_block_table():
    for gen in ("NVIDIA H200", "NVIDIA A100-SXM4-80GB", "NVIDIA L4", "NVIDIA B200", None):
        for kind in tuning.KINDS:
            for d in (16, 64, 100, 128, 256):
                b = tuning.attention_blocks(d, jnp.bfloat16, gen, kind)
                for n in (b.block_q, b.block_k):
                    assert n >= 16 and n & (n - 1) == 0, (gen, kind, d, b)
                assert b.num_warps in (1, 2, 4, 8, 16) and b.num_stages >= 1
    assert tuning.generation("NVIDIA H200") == "hopper"
    assert tuning.generation("Some future GPU") == "ampere"
    bf16 = tuning.attention_blocks(128, jnp.bfloat16, "NVIDIA H200", "fwd")
    f32 = tuning.attention_blocks(128, jnp.float32, "NVIDIA H200", "fwd")
    assert f32.block_k == bf16.block_k // 2
    assert tuning.attention_blocks(128, interpret=True).block_q == 16
    with pytest.raises(ValueError, match="kind"):
        tuning.attention_blocks(128, kind="sideways")


def test_tuning_file_overrides_the_table(tmp_path, monkeypatch):
    path = tmp_path / "tuning.json"
    path.write_text('{"bwd": {"64": [32, 64, 4, 3]}}')
    before = tuning.attention_blocks(64, jnp.bfloat16, "NVIDIA H200", "bwd")
    monkeypatch.setenv(tuning.OVERRIDE_ENV, str(path))
    assert (
        tuning.attention_blocks(64, jnp.bfloat16, "NVIDIA H200", "bwd")
        == tuning.Blocks(32, 64, 4, 3)
        != before
    )
    assert tuning.attention_blocks(60, jnp.bfloat16, "NVIDIA L4", "bwd").block_q == 32
    # other kinds and head dims keep the table's rows
    assert (
        tuning.attention_blocks(128, jnp.bfloat16, "NVIDIA H200", "bwd")
        == (tuning._TABLE["hopper"]["bwd"][128])
    )
    # a rewritten file is read again
    path.write_text('{"bwd": {"64": [16, 64, 4, 2]}}')
    os.utime(path, ns=(1, 10**18))
    assert tuning.attention_blocks(64, jnp.bfloat16, "NVIDIA H200", "bwd").block_q == 16
    bad = tmp_path / "bad.json"
    bad.write_text('{"sideways": {"64": [32, 64, 4, 3]}}')
    monkeypatch.setenv(tuning.OVERRIDE_ENV, str(bad))
    with pytest.raises(ValueError, match=r"SEQMIX_ATTENTION_TUNING.*sideways"):
        tuning.attention_blocks(64, kind="bwd", device_kind="NVIDIA H200")
    monkeypatch.setenv(tuning.OVERRIDE_ENV, str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="SEQMIX_ATTENTION_TUNING"):
        tuning.attention_blocks(64, kind="bwd", device_kind="NVIDIA H200")


# --- lowering for the H200 (nothing runs) ----------------------------------------------------


def _grad_fn(window, segments, softcap):
    def f(q, k, v, seg):
        def loss(q, k, v):
            o, lse = triton.flash_attention(
                q,
                k,
                v,
                window=window,
                softcap=softcap,
                segment_ids=seg if segments else None,
                interpret=False,
            )
            return jnp.sum(o.astype(jnp.float32)) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0))

        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    return f


@pytest.mark.parametrize(
    "D, Hkv, window, segments, softcap, dtype",
    [
        (64, 2, (256, 0), False, None, jnp.bfloat16),
        (128, 2, (256, 0), True, 30.0, jnp.bfloat16),
        (128, 8, (None, None), False, None, jnp.bfloat16),
        (256, 2, (None, 0), False, None, jnp.bfloat16),
        (64, 8, (None, 0), False, None, jnp.float32),
    ],
)
def test_lowers_for_cuda(D, Hkv, window, segments, softcap, dtype):
    """Forward and backward at T = 1024 lower to Triton for an H200 (GQA 4:1 and MHA)."""
    B, T, H = 2, 1024, 8
    q = jax.ShapeDtypeStruct((B, T, H, D), dtype)
    kv = jax.ShapeDtypeStruct((B, T, Hkv, D), dtype)
    seg = jax.ShapeDtypeStruct((B, T), jnp.int32)
    text = testing.lower_for(_grad_fn(window, segments, softcap), q, kv, kv, seg)
    for name in (
        "seqmix_flash_fwd",
        "seqmix_flash_bwd_delta",
        "seqmix_flash_bwd_dkdv",
        "seqmix_flash_bwd_dq",
    ):
        assert name in text, name
