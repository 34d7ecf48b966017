"""attention and decode_attention, implementation="pallas_triton": tiles other than the
interpreter's (rectangular, and the table's Hopper rows) in interpret mode, block sparsity,
the tile table and its tuning file, the decoder's split count, and lowering for an H200
(forward and backward; nothing runs)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqmix import testing
from seqmix.kernels.attention import reference, triton, tuning
from seqmix.kernels.attention.triton import blocks, decode

from .cases import Case, inputs


def _qkv(seed, B, T, S, H, Hkv, D, dtype):
    return inputs(Case("", B, T, S, H, Hkv, D, jnp.dtype(dtype).name), seed)


def test_rectangular_tiles_and_many_blocks():
    """Unequal tiles per kernel (32x16 forward, 16x32 dK/dV, 32x32 dQ) over many blocks, so
    that interior (unmasked) and edge blocks of every loop are exercised."""
    seed = testing.fresh_seed()
    q, k, v, _ = _qkv(seed, 1, 90, 90, 4, 2, 16, jnp.float32)
    B = tuning.Blocks
    config = tuning.TritonConfig(fwd=B(32, 16, 4, 1), bwd=B(16, 32, 4, 1), bwd_dq=B(32, 32, 4, 1))
    for window in [(20, 45), (None, 30)]:
        testing.check_against(
            lambda q, k, v: triton.flash_attention(
                q, k, v, window=window, softcap=7.0, config=config, interpret=True
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
    q, k, v, _ = _qkv(seed, 1, 200, 200, 4, 2, D, jnp.float32)
    config = tuning.TritonConfig(
        **{
            kind: tuning.attention_blocks(D, jnp.bfloat16, "NVIDIA H200", kind)
            for kind in ("fwd", "bwd", "bwd_dq")
        }
    )
    testing.check_against(
        lambda q, k, v: triton.flash_attention(
            q, k, v, window=(None, 0), config=config, interpret=True
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
    st = blocks.Static(
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
        for lo, hi, *_ in (blocks.key_blocks(jnp.int32(i * bq), bq, bk, nk, st) for i in range(nq))
    )
    bwd = sum(
        int(hi) - int(lo)
        for lo, hi, *_ in (
            blocks.query_blocks(jnp.int32(j * bk), bk, bq, nq, st) for j in range(nk)
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
        st = blocks.Static(
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
            lo, hi, flo, fhi = map(int, blocks.key_blocks(jnp.int32(i * bq), bq, bk, T // bk, st))
            assert set(np.flatnonzero(any_[i])) <= set(range(lo, hi)), (window, i)
            assert set(np.flatnonzero(all_[i])) == set(range(flo, fhi)), (window, i)
        for j in range(T // bk):
            lo, hi, flo, fhi = map(int, blocks.query_blocks(jnp.int32(j * bk), bk, bq, T // bq, st))
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


def test_float32_tiles_fit_shared_memory():
    """float32 tiles fit each generation's shared memory: the halved table row at D = 128 on
    three stages (128 x 64 keys) would take 256 KB, which an H100 refuses (it grants 227)."""
    halved = tuning.Blocks(128, 64, 8, 3)
    assert tuning.smem_bytes(halved, "fwd", 128, 4) > 232448
    for device in ("NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB", "NVIDIA L4"):
        budget = tuning.SMEM_BYTES[tuning.generation(device)]
        for kind in tuning.FLASH_KINDS:
            for d in (16, 64, 128, 256):
                for dtype in (jnp.float32, jnp.bfloat16):
                    b = tuning.attention_blocks(d, dtype, device, kind)
                    itemsize = jnp.dtype(dtype).itemsize
                    assert tuning.smem_bytes(b, kind, d, itemsize) <= budget, (device, kind, d, b)
                    assert min(b.block_q, b.block_k) >= 16
    f32 = tuning.attention_blocks(128, jnp.float32, "NVIDIA H100 80GB HBM3", "fwd")
    assert (f32.block_q, f32.block_k, f32.num_stages) == (128, 64, 2)


def test_tuning_file_overrides_the_table(tmp_path, monkeypatch):
    from seqmix.kernels import tune

    path = tmp_path / "tuning.json"
    bwd = {"block_q": 32, "block_k": 64, "num_warps": 4, "num_stages": 3}
    path.write_text(json.dumps({"attention": {"pallas_triton": {"d64": {"config": {"bwd": bwd}}}}}))
    before = tuning.triton_config(
        None, 64, jnp.bfloat16, interpret=False, device_kind="NVIDIA H200"
    )
    monkeypatch.setenv(tune.ENV, str(path))
    after = tuning.triton_config(None, 64, jnp.bfloat16, interpret=False, device_kind="NVIDIA H200")
    assert after.bwd == tuning.Blocks(32, 64, 4, 3) != before.bwd
    assert after.fwd == before.fwd  # other kernels keep the table's rows
    # float32 halves the file's block_k as it halves the table's; interpret mode ignores it
    f32 = tuning.triton_config(None, 64, jnp.float32, interpret=False, device_kind="NVIDIA H200")
    assert f32.bwd == tuning.Blocks(32, 32, 4, 3)
    assert tuning.triton_config(None, 64, jnp.bfloat16, interpret=True).bwd.block_q == 16
    # other head dims keep the table's rows; a caller's Config wins over the file
    d128 = tuning.triton_config(None, 128, jnp.bfloat16, interpret=False, device_kind="NVIDIA H200")
    assert d128.bwd == tuning._TABLE["hopper"]["bwd"][128]
    own = tuning.TritonConfig(bwd=tuning.Blocks(16, 16, 4, 1))
    assert tuning.triton_config(own, 64, jnp.bfloat16, interpret=False).bwd == own.bwd
    # a rewritten file is read again
    bwd["block_q"] = 16
    path.write_text(json.dumps({"attention": {"pallas_triton": {"d64": {"config": {"bwd": bwd}}}}}))
    os.utime(path, ns=(1, 10**18))
    assert tuning.triton_config(None, 64, jnp.bfloat16, interpret=False).bwd.block_q == 16
    bad = tmp_path / "bad.json"
    bad.write_text(
        json.dumps({"attention": {"pallas_triton": {"d64": {"config": {"sideways": 1}}}}})
    )
    monkeypatch.setenv(tune.ENV, str(bad))
    with pytest.raises(ValueError, match=r"SEQMIX_TUNING.*sideways"):
        tuning.triton_config(None, 64, jnp.bfloat16, interpret=False)
    monkeypatch.setenv(tune.ENV, str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="SEQMIX_TUNING"):
        tuning.triton_config(None, 64, jnp.bfloat16, interpret=False)


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


def test_separate_key_ids_lower_for_cuda():
    """Queries of one block against a longer key block with their own ids (the context-
    parallel pairs of a packed sequence), forward and backward, lower for an H200."""

    def grads(q, k, v, q_ids, kv_ids):
        def loss(q, k, v):
            o, lse = triton.flash_attention(
                q, k, v, segment_ids=q_ids, kv_segment_ids=kv_ids, interpret=False
            )
            return jnp.sum(o.astype(jnp.float32)) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0))

        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    sd = jax.ShapeDtypeStruct
    B, T, S, H, Hkv, D = 1, 1024, 3072, 8, 2, 128
    text = testing.lower_for(
        grads,
        sd((B, T, H, D), jnp.bfloat16),
        sd((B, S, Hkv, D), jnp.bfloat16),
        sd((B, S, Hkv, D), jnp.bfloat16),
        sd((B, T), jnp.int32),
        sd((B, S), jnp.int32),
    )
    for name in ("seqmix_flash_fwd", "seqmix_flash_bwd_dkdv", "seqmix_flash_bwd_dq"):
        assert name in text, name


# --- the split-K decoder ----------------------------------------------------------------------


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


def test_decode_lowers_at_128k():
    q, k, lengths = _cache(131072)
    text = testing.lower_for(
        lambda q, k, v, n: triton.decode_attention(q, k, v, n, scale=128**-0.5, softcap=30.0),
        q,
        k,
        k,
        lengths,
        platform="cuda",
    )
    assert "__gpu$xla.gpu.triton" in text


def test_decode_lowers_with_gradient_and_other_dtypes():
    """fp16 / fp32, MQA, D = 64 and 256, and the custom_vjp backward, at a 4k cache."""
    for dtype, H, Hkv, D in [(jnp.float16, 8, 1, 64), (jnp.float32, 4, 4, 256)]:
        q, k, lengths = _cache(4096, dtype, B=2, H=H, Hkv=Hkv, D=D)
        grads = jax.grad(
            lambda q, k, v, n: (
                triton.decode_attention(q, k, v, n, scale=0.1, softcap=None)
                .astype(jnp.float32)
                .sum()
            ),
            argnums=(0, 1, 2),
        )
        testing.lower_for(grads, q, k, k, lengths, platform="cuda")
