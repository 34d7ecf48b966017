"""linear_attention and linear_attention_step, implementation="pallas_tpu": argument checks
and the lowering of forward, backward and the decoding step for a TPU at a realistic shape
(nothing runs)."""

import jax
import jax.numpy as jnp
import pytest

from seqmix import testing
from seqmix.kernels import interpret
from seqmix.kernels.linear_attention import linear_attention, linear_attention_step

from .cases import Case, inputs


def test_chunk_size_must_be_a_multiple_of_16():
    q, k, v, g, _, _ = inputs(Case("", 1, 8, 1, 1, 16, 16, "scalar", 16, "float32"), 0)
    with interpret(), pytest.raises(NotImplementedError, match="multiple of 16"):
        linear_attention(q, k, v, g, chunk_size=24, implementation="pallas_tpu")


@pytest.mark.parametrize("decay", ["scalar", "channel"])
def test_lowers_for_tpu(decay):
    """Forward and backward of the public op lower to Mosaic at [2, 2048, 8, 128] bf16
    (segments, states in and out); so does the decoding step."""
    B, T, H, D = 2, 2048, 8, 128
    x = jnp.zeros((B, T, H, D), jnp.bfloat16)
    g = jnp.zeros((B, T, H) if decay == "scalar" else (B, T, H, D), jnp.float32)
    s0 = jnp.zeros((B, H, D, D), jnp.float32)
    seg = jnp.zeros((B, T), jnp.int32)

    def fwd_bwd(q, k, v, g, s0, seg):
        def loss(q, k, v, g, s0):
            o, s = linear_attention(
                q,
                k,
                v,
                g,
                initial_state=s0,
                segment_ids=seg,
                return_final_state=True,
                implementation="pallas_tpu",
            )
            return o.astype(jnp.float32).sum() + s.sum()

        return jax.grad(loss, argnums=(0, 1, 2, 3, 4))(q, k, v, g, s0)

    text = testing.lower_for(fwd_bwd, x, x, x, g, s0, seg, platform="tpu")
    assert text.count("tpu_custom_call") == 2  # one forward kernel, one backward kernel
    text = testing.lower_for(
        lambda q, k, v, s, g: linear_attention_step(q, k, v, s, g, implementation="pallas_tpu"),
        x[:, 0],
        x[:, 0],
        x[:, 0],
        s0,
        g[:, 0],
        platform="tpu",
    )
    assert "tpu_custom_call" in text
