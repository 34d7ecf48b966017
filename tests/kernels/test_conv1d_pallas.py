"""causal_conv1d / causal_conv1d_step: the Pallas Triton and TPU kernels (interpret mode)
against the naive oracle, outputs, final states and every gradient; the step kernel repeated
equals the full op; and lowering for an H200 and a TPU."""

import jax
import jax.numpy as jnp
import pytest

from seqmix import testing
from seqmix.kernels import causal_conv1d, causal_conv1d_step, interpret

IMPLS = ["pallas_triton", "pallas_tpu"]
NAMES = ["x", "weight", "bias", "initial_state"]


def _inputs(seed, B, T, C, W, dtype, bias, state):
    ks = jax.random.split(jax.random.key(seed), 4)
    x = jax.random.normal(ks[0], (B, T, C), jnp.float32).astype(dtype)
    w = 0.5 * jax.random.normal(ks[1], (W, C), jnp.float32)
    b = jax.random.normal(ks[2], (C,), jnp.float32) if bias else None
    h = jax.random.normal(ks[3], (B, W - 1, C), jnp.float32).astype(dtype) if state else None
    return x, w, b, h


CASES = {
    # name: (B, T, C, W, dtype, bias, activation, initial state)
    "w4-silu-bias-state-several-tiles": (2, 37, 24, 4, jnp.float32, True, "silu", True),
    "w5-T-shorter-than-history": (1, 2, 16, 5, jnp.float32, False, None, True),
    "w2-bf16-silu-bias-no-state": (2, 9, 20, 2, jnp.bfloat16, True, "silu", False),
    "w8-silu-state": (1, 13, 8, 8, jnp.float32, False, "silu", True),
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_oracle(impl, case):
    B, T, C, W, dtype, bias, activation, state = CASES[case]
    seed = testing.fresh_seed()
    x, w, b, h = _inputs(seed, B, T, C, W, dtype, bias, state)
    argnums = [0, 1] + ([2] if bias else []) + ([3] if state else [])

    def run(implementation):
        def f(x, w, b, h):
            return causal_conv1d(
                x,
                w,
                b,
                activation=activation,
                initial_state=h,
                return_final_state=True,
                implementation=implementation,
            )

        return f

    with interpret():
        testing.check_against(
            run(impl),
            run("naive"),
            (x, w, b, h),
            argnums=argnums,
            tol=testing.tolerance(dtype),
            seed=seed,
            names=[NAMES[i] for i in argnums],
        )


@pytest.mark.parametrize("impl", IMPLS)
def test_step_repeated_equals_full_op(impl):
    """Three decoding steps from a state give the outputs and final state of the full op."""
    seed = testing.fresh_seed()
    B, T, C, W = 3, 3, 20, 4
    x, w, b, h = _inputs(seed, B, T, C, W, jnp.float32, True, True)
    state, ys = h, []
    with interpret():
        for t in range(T):
            y, state = causal_conv1d_step(
                x[:, t], state, w, b, activation="silu", implementation=impl
            )
            ys.append(y)
    y_ref, final_ref = causal_conv1d(
        x, w, b, activation="silu", initial_state=h, return_final_state=True, implementation="naive"
    )
    testing.assert_close(jnp.stack(ys, axis=1), y_ref, 1e-5, f"step outputs (seed {seed})")
    testing.assert_close(state, final_ref, 1e-5, f"final state (seed {seed})")


@pytest.mark.parametrize("implementation", IMPLS)
def test_lowers_forward_backward_and_step(implementation):
    """[2, 2048, 3072] width 4 bf16 with bias, SiLU and a state, through the public ops:
    forward, backward and the step kernel lower for an H200 (Triton) and a TPU (Mosaic);
    nothing runs."""
    platform = "cuda" if implementation == "pallas_triton" else "tpu"
    B, T, C, W = 2, 2048, 3072, 4
    bf, f32 = jnp.bfloat16, jnp.float32
    sd = jax.ShapeDtypeStruct

    def loss(x, w, b, h):
        y, final = causal_conv1d(
            x,
            w,
            b,
            activation="silu",
            initial_state=h,
            return_final_state=True,
            implementation=implementation,
        )
        return jnp.sum(y.astype(f32)) + jnp.sum(final.astype(f32))

    def step(x, s, w, b):
        return causal_conv1d_step(x, s, w, b, activation="silu", implementation=implementation)

    marker = "__gpu$xla.gpu.triton" if platform == "cuda" else "tpu_custom_call"
    text = testing.lower_for(
        jax.grad(loss, argnums=(0, 1, 2, 3)),
        sd((B, T, C), bf),
        sd((W, C), f32),
        sd((C,), f32),
        sd((B, W - 1, C), bf),
        platform=platform,
    )
    assert text.count(marker) >= 2, "expected the forward and backward kernels"
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
    x, w, _, _ = _inputs(0, 1, 4, 8, W, jnp.float32, False, False)
    with interpret(), pytest.raises(NotImplementedError, match="width"):
        causal_conv1d(x, w, implementation=impl)
