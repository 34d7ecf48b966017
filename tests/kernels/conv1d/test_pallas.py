"""causal_conv1d / causal_conv1d_step with the Pallas Triton and TPU kernels: widths they do
not take, and lowering of forward, backward and the step kernel for an H200 and a TPU
(nothing runs)."""

import jax
import jax.numpy as jnp
import pytest

from seqmix import testing
from seqmix.kernels import causal_conv1d, causal_conv1d_step, interpret

from .cases import Case, inputs

IMPLS = ["pallas_triton", "pallas_tpu"]


@pytest.mark.parametrize("implementation", IMPLS)
def test_lowers_forward_backward_and_step(implementation):
    """[2, 2048, 3072] width 4 bf16 with bias, SiLU and a state, through the public ops:
    forward, backward and the step kernel lower for an H200 (Triton) and a TPU (Mosaic);
    nothing runs. The loss's value is returned with its gradient: the backward kernel does
    not read y, so a gradient alone would let the compiler drop the forward kernel."""
    platform = "cuda" if implementation == "pallas_triton" else "tpu"
    B, T, C, W = 2, 2048, 3072, 4
    bf, f32 = jnp.bfloat16, jnp.float32
    sd = jax.ShapeDtypeStruct

    def loss(x, w, b, h, ct):
        y, final = causal_conv1d(
            x,
            w,
            b,
            activation="silu",
            initial_state=h,
            return_final_state=True,
            implementation=implementation,
        )
        return jnp.sum(y.astype(f32) * ct) + jnp.sum(final.astype(f32))

    def step(x, s, w, b):
        return causal_conv1d_step(x, s, w, b, activation="silu", implementation=implementation)

    marker = "__gpu$xla.gpu.triton" if platform == "cuda" else "tpu_custom_call"
    text = testing.lower_for(
        jax.value_and_grad(loss, argnums=(0, 1, 2, 3)),
        sd((B, T, C), bf),
        sd((W, C), f32),
        sd((C,), f32),
        sd((B, W - 1, C), bf),
        sd((B, T, C), f32),
        platform=platform,
    )
    assert text.count(marker) >= 2, "expected the forward and backward kernels"
    for name in ("causal_conv1d_fwd", "causal_conv1d_bwd"):
        assert name in text, f"kernel {name} missing from the module"
    text = testing.lower_for(
        step,
        sd((B, C), bf),
        sd((B, W - 1, C), bf),
        sd((W, C), f32),
        sd((C,), f32),
        platform=platform,
    )
    assert text.count(marker) >= 1, "expected the step kernel"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("W", [1, 9])
def test_width_outside_two_to_eight_is_not_implemented(impl, W):
    x, w, _, _ = inputs(Case("", 1, 4, 8, W, bias=False, state=False), 0)
    with interpret(), pytest.raises(NotImplementedError, match="width"):
        causal_conv1d(x, w, implementation=impl)
