"""linear_attention, implementation="pallas_triton": the two-level state pass's plan (the
variant each case asks for is the one that runs; "auto" at the benchmark shapes), argument
checks, and the lowering of the kernels and the decoding step for an H200 at realistic
shapes (nothing runs)."""

import jax
import jax.numpy as jnp
import pytest

from seqmix import testing
from seqmix.kernels import interpret, linear_attention
from seqmix.kernels.linear_attention import triton as triton_module
from seqmix.kernels.linear_attention import tuning as la_tuning
from seqmix.kernels.linear_attention.triton import plan
from seqmix.kernels.linear_attention.triton import step as step_module

from .cases import CASES, TRITON

TWO_LEVEL = [c for c in CASES if TRITON in c.configs]


@pytest.mark.parametrize("case", TWO_LEVEL, ids=lambda c: c.name)
def test_the_two_level_cases_run_the_two_level_pass(case):
    """The variant a case of the table asks for is the one under test."""
    x = jnp.zeros((case.B, case.T, case.Hqk, case.K))
    g = {
        "none": None,
        "scalar": jnp.zeros((case.B, case.T, case.Hv)),
        "channel": jnp.zeros((case.B, case.T, case.Hv, case.K)),
    }[case.decay]
    with interpret():
        p = plan.make_plan(
            x,
            jnp.zeros((case.B, case.T, case.Hv, case.V)),
            g,
            None,
            None,
            scale=1.0,
            chunk_size=case.chunk,
            config=case.configs[TRITON],
        )
    assert p.segments > 1, p


@pytest.mark.parametrize("B,T,want", [(8, 4096, 1), (2, 16384, 5), (1, 65536, 9)])
def test_two_level_auto_segments_at_benchmark_shapes(B, T, want):
    """ "auto" keeps one pass where the grid is full and splits where it is not (H = 16,
    D = 128: 4 state blocks of 64x64 per head)."""
    x = jax.ShapeDtypeStruct((B, T, 16, 128), jnp.bfloat16)
    p = plan.make_plan(
        x,
        x,
        jax.ShapeDtypeStruct((B, T, 16), jnp.float32),
        None,
        None,
        scale=1.0,
        chunk_size=64,
        config=la_tuning.TritonConfig(state_segments="auto"),
    )
    assert p.segments == want
    assert (p.segments - 1) * p.segment_chunks < p.chunks
    assert p.segments * p.segment_chunks >= p.chunks
    if want > 1:
        assert (p.state_block_k, p.state_block_v) == (64, 64)
    g = jax.ShapeDtypeStruct((B, T, 16), jnp.float32)
    default = plan.make_plan(x, x, g, None, None, scale=1.0, chunk_size=64)
    assert default.segments == want  # "auto" is the default
    single = plan.make_plan(
        x,
        x,
        g,
        None,
        None,
        scale=1.0,
        chunk_size=64,
        config=la_tuning.TritonConfig(state_segments=1),
    )
    assert single.segments == 1


def test_state_segments_must_be_valid():
    x = jnp.zeros((1, 64, 1, 16))
    with pytest.raises(ValueError, match="state_segments"):
        plan.make_plan(
            x,
            x,
            None,
            None,
            None,
            scale=1.0,
            chunk_size=16,
            config=la_tuning.TritonConfig(state_segments="many"),
        )


def test_chunk_size_must_suit_triton():
    q = jnp.zeros((1, 8, 1, 16))
    with interpret(), pytest.raises(NotImplementedError, match="chunk_size"):
        linear_attention(q, q, q, chunk_size=24, implementation="pallas_triton")


# --- lowering for the H200 (nothing runs) ----------------------------------------------------


@pytest.mark.parametrize(
    "decay,D,segments",
    [
        ("scalar", 128, False),
        ("channel", 128, False),
        ("scalar", 64, True),
        ("channel", 256, True),
        ("none", 256, False),
    ],
)
def test_lowers_for_gpu(decay, D, segments):
    """Forward and backward at [2, 4096, 16, D] bf16 lower to Triton for an H200."""
    B, T, H = 2, 4096, 16
    x = jnp.zeros((B, T, H, D), jnp.bfloat16)
    g = {"none": None, "scalar": jnp.zeros((B, T, H)), "channel": jnp.zeros((B, T, H, D))}[decay]
    s0 = jnp.zeros((B, H, D, D))
    runs = jnp.zeros((B, T), jnp.int32) if segments else None

    def fwd_bwd(q, k, v, g, s0):
        def f(q, k, v, g, s0):
            return triton_module.linear_attention(
                q, k, v, g, scale=D**-0.5, initial_state=s0, runs=runs
            )

        out, vjp = jax.vjp(f, q, k, v, g, s0)
        return out, vjp(out)

    with interpret(False):
        text = testing.lower_for(fwd_bwd, x, x, x, g, s0, platform="cuda")
    for kernel in ("chunk_states", "chunk_output", "chunk_state_grads", "chunk_dv", "chunk_dqk"):
        assert f"linear_attention_{kernel}" in text


@pytest.mark.parametrize(
    "B,T,decay,segments",
    [(1, 65536, "scalar", False), (1, 8192, "channel", True)],
)
def test_two_level_lowers_for_gpu(B, T, decay, segments):
    """Forward and backward with ``state_segments="auto"`` at
    [B, T, 16, 128] bf16 lower to Triton for an H200 (P = 9 segments at T = 65536)."""
    H, D = 16, 128
    x = jnp.zeros((B, T, H, D), jnp.bfloat16)
    g = jnp.zeros((B, T, H)) if decay == "scalar" else jnp.zeros((B, T, H, D))
    s0 = jnp.zeros((B, H, D, D))
    runs = jnp.zeros((B, T), jnp.int32) if segments else None
    config = la_tuning.TritonConfig(state_segments="auto")
    p = plan.make_plan(x, x, g, s0, runs, scale=1.0, chunk_size=64, config=config)
    assert p.segments > 1

    def fwd_bwd(q, k, v, g, s0):
        def f(q, k, v, g, s0):
            return triton_module.linear_attention(
                q, k, v, g, scale=D**-0.5, initial_state=s0, runs=runs, config=config
            )

        out, vjp = jax.vjp(f, q, k, v, g, s0)
        return out, vjp(out)

    with interpret(False):
        text = testing.lower_for(fwd_bwd, x, x, x, g, s0, platform="cuda")
    for kernel in (
        "chunk_states",
        "combine_segments",
        "chunk_output",
        "chunk_state_grads",
        "chunk_dv",
        "chunk_dqk",
    ):
        assert f"linear_attention_{kernel}" in text


def test_step_lowers_for_gpu():
    B, H, D = 8, 16, 128
    x = jnp.zeros((B, H, D), jnp.bfloat16)
    with interpret(False):
        text = testing.lower_for(
            lambda q, k, v, s, g: step_module.linear_attention_step(q, k, v, s, g, scale=0.1),
            x,
            x,
            x,
            jnp.zeros((B, H, D, D)),
            jnp.zeros((B, H)),
            platform="cuda",
        )
    assert "linear_attention_step" in text
