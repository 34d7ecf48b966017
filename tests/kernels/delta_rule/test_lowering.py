"""gated_delta_rule: the Triton kernels (forward, backward and the decoding step) lower for
an H200 and the TPU kernels for a TPU at realistic shapes, through the public op (nothing
runs), so that a kernel that cannot be compiled shows on the CPU."""

import jax
import jax.numpy as jnp
import pytest

from seqmix import testing
from seqmix.kernels import gated_delta_rule, gated_delta_rule_step, interpret
from seqmix.kernels.delta_rule.tuning import TritonConfig

TRITON_KERNELS = (
    "wy",
    "chunk_states",
    "linear_attention_chunk_output",
    "chunk_state_grads",
    "linear_attention_chunk_dqk",
    "wy_backward",
)


@pytest.mark.parametrize(
    "implementation, config",
    [
        ("pallas_triton", None),
        ("pallas_triton", TritonConfig(inverse_block=0)),
        ("pallas_triton", TritonConfig(wy_backward="split")),
        ("pallas_tpu", None),
    ],
    ids=["pallas_triton", "pallas_triton-inverse-elimination", "pallas_triton-split", "pallas_tpu"],
)
@pytest.mark.parametrize("decay", [True, False], ids=["decay", "no-decay"])
def test_forward_and_backward_lower(implementation, config, decay):
    """[2, 2048, 4 v heads over 2 q/k heads, 128] bf16 with every optional argument (and
    the UT inverse by elimination, and the WY backward as two kernels)."""
    B, T, H, D = 2, 2048, 4, 128
    platform = "cuda" if implementation == "pallas_triton" else "tpu"
    qk = jnp.zeros((B, T, H // 2, D), jnp.bfloat16)
    v = jnp.zeros((B, T, H, D), jnp.bfloat16)
    beta = jnp.zeros((B, T, H))
    g = jnp.zeros((B, T, H)) if decay else None
    s0 = jnp.zeros((B, H, D, D))
    seg = jnp.zeros((B, T), jnp.int32)

    def fwd_bwd(q, k, v, beta, g, s0):
        def f(q, k, v, beta, g, s0):
            return gated_delta_rule(
                q,
                k,
                v,
                beta,
                g,
                initial_state=s0,
                segment_ids=seg,
                return_final_state=True,
                implementation=implementation,
                config=config,
            )

        out, vjp = jax.vjp(f, q, k, v, beta, g, s0)
        return out, vjp(out)

    with interpret(False):
        text = testing.lower_for(fwd_bwd, qk, qk, v, beta, g, s0, platform=platform)
    if platform == "cuda":
        for kernel in TRITON_KERNELS:
            name = kernel if kernel.startswith("linear_attention") else f"gated_delta_rule_{kernel}"
            assert name in text, f"kernel {name} missing from the module"
        split = config is not None and config.wy_backward == "split"
        for side in ("values", "keys"):
            assert (f"gated_delta_rule_wy_backward_{side}" in text) == split, side
    else:
        assert text.count("tpu_custom_call") >= 2


@pytest.mark.parametrize("implementation", ["pallas_triton", "pallas_tpu"])
def test_step_lowers(implementation):
    B, H, D = 8, 16, 128
    platform = "cuda" if implementation == "pallas_triton" else "tpu"
    x = jnp.zeros((B, H, D), jnp.bfloat16)
    with interpret(False):
        text = testing.lower_for(
            lambda q, k, v, b, s, g: gated_delta_rule_step(
                q, k, v, b, s, g, implementation=implementation
            ),
            x,
            x,
            x,
            jnp.zeros((B, H)),
            jnp.zeros((B, H, D, D)),
            jnp.zeros((B, H)),
            platform=platform,
        )
    assert "gated_delta_rule_step" in text
