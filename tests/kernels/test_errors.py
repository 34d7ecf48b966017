"""Bad input raises ValueError naming the argument; dispatch errors are explicit."""

import jax.numpy as jnp
import pytest

from seqmix.kernels import (
    attention,
    causal_conv1d,
    decode_attention,
    dispatch,
    linear_attention,
    linear_attention_step,
    selective_scan,
)

q = jnp.zeros((2, 8, 4, 16))
kv = jnp.zeros((2, 8, 2, 16))
ids8 = jnp.zeros((2, 8), jnp.int32)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: attention(q[0], kv, kv), "q must have rank 4"),
        (lambda: attention(q, jnp.zeros((2, 8, 3, 16)), jnp.zeros((2, 8, 3, 16))), "multiple"),
        (lambda: attention(q, kv, kv[:, :4]), "v must have shape"),
        (lambda: attention(q, kv, kv, local_window_size=-1), "local_window_size"),
        (lambda: attention(q, kv, kv, local_window_size=(2, -3)), "local_window_size"),
        (lambda: attention(q, kv, kv, segment_ids=jnp.zeros((2, 7), jnp.int32)), "segment_ids"),
        (lambda: attention(q, kv, kv, segment_ids=jnp.zeros((2, 8))), "segment_ids"),
        (lambda: attention(q, kv, kv, kv_segment_ids=ids8), "kv_segment_ids needs segment_ids"),
        (
            lambda: attention(q, kv, kv, segment_ids=ids8, kv_segment_ids=ids8[:, :5]),
            "kv_segment_ids",
        ),
        (
            lambda: attention(q, kv[:, :5], kv[:, :5], segment_ids=ids8),
            "segment_ids without kv_segment_ids",
        ),
        (lambda: attention(q, kv, kv, softcap=0.0), "softcap"),
        (lambda: attention(q, kv, kv, implementation="fast"), "implementation"),
        (lambda: attention(q.astype(jnp.int32), kv, kv), "q has dtype"),
        (lambda: decode_attention(q[:, 0], kv, kv, jnp.zeros((3,), jnp.int32)), "lengths"),
        (lambda: linear_attention(q, q, jnp.zeros((2, 8, 6, 16))), "multiple"),
        (lambda: linear_attention(q, q, q, jnp.full((2, 8, 4), 0.5)), "log_decay must be <= 0"),
        (lambda: linear_attention(q, q, q, jnp.zeros((2, 8))), "log_decay"),
        (lambda: linear_attention(q, q, q, jnp.zeros((2, 8, 4, 3))), "log_decay"),
        (
            lambda: linear_attention(q, q, q, initial_state=jnp.zeros((2, 4, 16, 17))),
            "initial_state",
        ),
        (
            lambda: linear_attention(q, q, q, segment_ids=jnp.zeros((2, 9), jnp.int32)),
            "segment_ids",
        ),
        (lambda: linear_attention(q, q, q, chunk_size=0), "chunk_size"),
        (lambda: linear_attention(q, q, q, implementation="cuda"), "implementation"),
        (
            lambda: linear_attention_step(q[:, 0], q[:, 0], q[:, 0], jnp.zeros((2, 4, 16, 8))),
            "state",
        ),
        (
            lambda: selective_scan(
                jnp.zeros((2, 8, 6)),
                jnp.zeros((2, 8, 6)),
                jnp.zeros((6, 4)),
                jnp.zeros((2, 8, 4, 4)),
                jnp.zeros((2, 8, 4, 4)),
            ),
            "groups",
        ),
        (
            lambda: selective_scan(
                jnp.zeros((2, 8, 6)),
                jnp.zeros((2, 8, 5)),
                jnp.zeros((6, 4)),
                jnp.zeros((2, 8, 4)),
                jnp.zeros((2, 8, 4)),
            ),
            "delta must have",
        ),
        (
            lambda: selective_scan(
                jnp.zeros((2, 8, 6)),
                jnp.zeros((2, 8, 6)),
                jnp.zeros((6, 4)),
                jnp.zeros((2, 8, 4)),
                jnp.zeros((2, 8, 4)),
                initial_state=jnp.zeros((2, 6, 3)),
            ),
            "initial_state",
        ),
        (lambda: causal_conv1d(jnp.zeros((2, 8, 6)), jnp.zeros((4, 5))), "weight must have"),
        (
            lambda: causal_conv1d(jnp.zeros((2, 8, 6)), jnp.zeros((4, 6)), activation="gelu"),
            "activation",
        ),
        (
            lambda: causal_conv1d(
                jnp.zeros((2, 8, 6)), jnp.zeros((4, 6)), initial_state=jnp.zeros((2, 4, 6))
            ),
            "initial_state",
        ),
    ],
)
def test_value_errors_name_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_positive_decay_is_checked_only_when_concrete():
    import jax

    g = jnp.full((2, 8, 4), 0.5)
    with pytest.raises(ValueError, match="log_decay"):
        linear_attention(q, q, q, g)
    # under jit the values are unknown: no error, no silent host sync
    jax.jit(lambda g: linear_attention(q, q, q, g))(g)


def test_named_implementation_never_falls_back():
    with dispatch.interpret(False):
        if dispatch.platform() == "cpu":
            with pytest.raises(NotImplementedError, match="SEQMIX_INTERPRET"):
                attention(q, kv, kv, implementation="pallas_tpu")
            with pytest.raises(NotImplementedError, match="GPU"):
                attention(q, kv, kv, implementation="cudnn")


def test_unknown_implementation_lists_the_valid_ones():
    with pytest.raises(ValueError) as e:
        selective_scan(
            jnp.zeros((1, 2, 3)),
            jnp.zeros((1, 2, 3)),
            jnp.zeros((3, 2)),
            jnp.zeros((1, 2, 2)),
            jnp.zeros((1, 2, 2)),
            implementation="scan",
        )
    for name in dispatch.IMPLEMENTATIONS:
        assert name in str(e.value)


def test_interpret_switch(monkeypatch):
    monkeypatch.setenv("SEQMIX_INTERPRET", "1")
    assert dispatch.interpret_mode()
    with dispatch.interpret(False):
        assert not dispatch.interpret_mode()
    monkeypatch.setenv("SEQMIX_INTERPRET", "0")
    assert not dispatch.interpret_mode()
    with dispatch.interpret():
        assert dispatch.interpret_mode()


def test_public_ops_lower_for_gpu_and_tpu_on_this_cpu():
    """The lowering check that CI runs for every kernel family works through the public API."""
    from seqmix import testing

    q = jnp.zeros((1, 256, 4, 64), jnp.bfloat16)
    k = jnp.zeros((1, 256, 2, 64), jnp.bfloat16)
    for platform, impl in (("cuda", "pallas_triton"), ("tpu", "pallas_tpu")):
        text = testing.lower_for(
            lambda q, k, v: attention(q, k, v, causal=True, implementation=impl),
            q,
            k,
            k,
            platform=platform,
        )
        assert ("triton" in text) if platform == "cuda" else ("tpu_custom_call" in text)
