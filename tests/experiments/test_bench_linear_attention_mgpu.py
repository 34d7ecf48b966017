"""The Mosaic GPU linear-attention benchmark runs its code paths on the CPU (interpreter)."""

import jax
import jax.numpy as jnp
import pytest

from seqmix import testing
from seqmix.experiments.bench import linear_attention_mgpu as bench
from seqmix.kernels import interpret, linear_attention
from seqmix.kernels.linear_attention.tuning import MosaicGpuConfig


def _once(fn, *args):
    jax.block_until_ready(fn(*args))
    return 1e-3


def test_rows_time_forward_and_backward_of_every_candidate(monkeypatch):
    monkeypatch.setenv("SEQMIX_BENCH_MGPU_CONFIGS", '[{"split_scores": false}]')
    B, T, H, D = bench.DRY_SHAPE
    with interpret():
        rows = bench.measure_shape("dry", B, T, H, D, "scalar", {}, peers=False, timer=_once)
    assert [r["impl"] for r in rows] == [
        "seqmix_pallas_mosaic_gpu",
        'seqmix_pallas_mosaic_gpu{"split_scores": false}',
    ]
    for row in rows:
        assert "error" not in row, row
        assert row["fwd_ms"] > 0 and row["fwdbwd_ms"] > 0 and row["plan"]


@pytest.mark.parametrize("decay", ["scalar", "channel"])
def test_every_candidate_lowers_for_gpu_at_8x4096(decay):
    """Each Config candidate fits the H200's shared memory and wgmma tiles (forward and
    backward at [8, 4096, 16, 128]): none fails to compile on the GPU."""
    B, T, H, D = 8, 4096, 16, 128
    x = jnp.zeros((B, T, H, D), jnp.bfloat16)
    g = jnp.zeros((B, T, H) if decay == "scalar" else (B, T, H, D))
    for overrides in bench.CANDIDATES:
        config = MosaicGpuConfig(**overrides)

        def fwd_bwd(q, k, v, g, config=config):
            def f(q, k, v, g):
                return linear_attention(
                    q, k, v, g, implementation="pallas_mosaic_gpu", config=config
                )

            o, vjp = jax.vjp(f, q, k, v, g)
            return o, vjp(o)

        testing.lower_for(fwd_bwd, x, x, x, g, platform="cuda")
