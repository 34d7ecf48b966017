"""Bad input to gated_delta_rule / gated_delta_rule_step raises ValueError naming the argument."""

import jax
import jax.numpy as jnp
import pytest

from seqmix.kernels import gated_delta_rule, gated_delta_rule_step

B, T, H, K = 2, 8, 2, 16
q = jnp.zeros((B, T, H, K))
v = jnp.zeros((B, T, 4, K))  # 4 v heads over 2 q/k heads
beta = jnp.full((B, T, 4), 0.5)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: gated_delta_rule(q[0], q, v, beta), "q must have rank 4"),
        (lambda: gated_delta_rule(q, q[:, :, :1], v, beta), "k must have shape"),
        (lambda: gated_delta_rule(q, q, v[:, :4], beta), "v must have shape"),
        (lambda: gated_delta_rule(q, q, jnp.zeros((B, T, 3, K)), beta[..., :3]), "multiple"),
        (lambda: gated_delta_rule(q, q, v.astype(jnp.bfloat16), beta), "share a dtype"),
        (lambda: gated_delta_rule(q.astype(jnp.int32), q, v, beta), "q has dtype"),
        (lambda: gated_delta_rule(q, q, v, beta[..., :2]), "beta must have shape"),
        (lambda: gated_delta_rule(q, q, v, beta[0]), "beta must have rank 3"),
        (lambda: gated_delta_rule(q, q, v, beta + 0.6), r"beta must lie in \[0, 1\]"),
        (lambda: gated_delta_rule(q, q, v, beta - 0.6), r"beta must lie in \[0, 1\]"),
        (lambda: gated_delta_rule(q, q, v, beta.at[0, 0, 0].set(jnp.nan)), "beta must lie"),
        (
            lambda: gated_delta_rule(q, q, v, beta, jnp.full((B, T, 4), 0.1)),
            "log_decay must be <= 0",
        ),
        (
            lambda: gated_delta_rule(q, q, v, beta, jnp.zeros((B, T, 4, K))),
            "log_decay must have shape",
        ),
        (
            lambda: gated_delta_rule(q, q, v, beta, jnp.zeros((B, T, 2))),
            "log_decay must have shape",
        ),
        (
            lambda: gated_delta_rule(q, q, v, beta, initial_state=jnp.zeros((B, 2, K, K))),
            "initial_state must have shape",
        ),
        (
            lambda: gated_delta_rule(q, q, v, beta, segment_ids=jnp.zeros((B, T + 1), jnp.int32)),
            "segment_ids",
        ),
        (lambda: gated_delta_rule(q, q, v, beta, segment_ids=jnp.zeros((B, T))), "segment_ids"),
        (lambda: gated_delta_rule(q, q, v, beta, chunk_size=0), "chunk_size"),
        (
            lambda: gated_delta_rule(q, q, v, beta, implementation="cuda"),
            r"has \('naive', 'xla', 'pallas_triton', 'pallas_tpu'\)",
        ),
        (
            lambda: gated_delta_rule_step(
                q[:, 0], q[:, 0], v[:, 0], beta[:, 0], jnp.zeros((B, 4, K, 8))
            ),
            "state must have shape",
        ),
        (
            lambda: gated_delta_rule_step(
                q[:, 0], q[:, 0], v[:, 0], beta[:, 0] + 1, jnp.zeros((B, 4, K, K))
            ),
            "beta must lie",
        ),
        (
            lambda: gated_delta_rule_step(
                q[:, 0], q[:, 0], v[:, 0], beta[:, 0], jnp.zeros((B, 4, K, K)), jnp.ones((B, 4))
            ),
            "log_decay must be <= 0",
        ),
        (
            lambda: gated_delta_rule_step(
                q[:, 0],
                q[:, 0],
                v[:, 0],
                beta[:, 0],
                jnp.zeros((B, 4, K, K)),
                implementation="fast",
            ),
            "gated_delta_rule_step has",
        ),
    ],
)
def test_bad_input_raises_value_error_naming_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_a_known_implementation_without_a_kernel_says_what_exists():
    with pytest.raises(NotImplementedError, match=r"has \('naive', 'xla', 'pallas_triton'"):
        gated_delta_rule(q, q, v, beta, implementation="pallas_mosaic_gpu")


def test_a_kernel_off_its_platform_says_how_to_run_it():
    with pytest.raises(NotImplementedError, match="needs a TPU"):
        gated_delta_rule(q, q, v, beta, implementation="pallas_tpu")


def test_value_checks_are_skipped_under_tracing():
    """beta and log_decay values are checked when concrete; under jit they cannot be."""
    out = jax.jit(lambda b: gated_delta_rule(q, q, v, b, implementation="xla"))(beta)
    assert out.shape == v.shape


def test_a_bad_config_field_is_named():
    from seqmix.kernels import interpret
    from seqmix.kernels.delta_rule.tuning import TritonConfig

    with interpret(), pytest.raises(ValueError, match=r"TritonConfig\.wy_backward"):
        gated_delta_rule(
            q, q, v, beta, implementation="pallas_triton", config=TritonConfig(wy_backward="x")
        )
