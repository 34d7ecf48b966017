"""log_decay = -inf is a hard reset in every implementation: the state before it is dropped
exactly, outputs and gradients are finite and match the recurrence (the naive oracle, where
exp(-inf) = 0 needs no care), for linear attention (scalar and per-channel decay, the Mosaic
GPU engine in bf16) and the gated delta rule, on the CPU implementations (interpret mode)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqmix import testing
from seqmix.kernels import gated_delta_rule, interpret, linear_attention

F32 = jnp.float32


def _decays(key, shape, resets):
    g = jax.random.uniform(key, shape, F32, -1.0, 0.0)
    for t in resets:  # every head and channel of step t (and one head alone at t + 3)
        g = g.at[:, t].set(-jnp.inf)
    return g.at[:, resets[0] + 3, 0].set(-jnp.inf)


def _inputs(T, H, K, V, dtype, per_channel=False, resets=(5, 21, 22)):
    ks = jax.random.split(jax.random.key(testing.fresh_seed()), 5)
    q = jax.random.normal(ks[0], (1, T, H, K), F32).astype(dtype)
    k = jax.random.normal(ks[1], (1, T, H, K), F32)
    k = (k / jnp.linalg.norm(k, axis=-1, keepdims=True)).astype(dtype)
    v = jax.random.normal(ks[2], (1, T, H, V), F32).astype(dtype)
    g = _decays(ks[3], (1, T, H, K) if per_channel else (1, T, H), resets)
    s0 = jax.random.normal(ks[4], (1, H, K, V), F32)
    return q, k, v, g, s0


def _check(fn, impl, args, tol, **kw):
    def loss(*a):
        o, s = fn(*a, implementation=impl, return_final_state=True, **kw)
        return jnp.sum(o.astype(F32) ** 2) + jnp.sum(s**2), (o, s)

    with interpret():
        (_, (o, s)), grads = jax.jit(
            jax.value_and_grad(loss, argnums=tuple(range(len(args))), has_aux=True)
        )(*args)
    up = [a.astype(F32) if a.dtype != F32 else a for a in args]
    naive_kw = {k: v for k, v in kw.items() if k != "chunk_size"}
    (_, (o_ref, s_ref)), g_ref = jax.jit(
        jax.value_and_grad(
            lambda *a: (lambda o, s: (jnp.sum(o**2) + jnp.sum(s**2), (o, s)))(
                *fn(*a, implementation="naive", return_final_state=True, **naive_kw)
            ),
            argnums=tuple(range(len(up))),
            has_aux=True,
        )
    )(*up)
    testing.assert_close(o, o_ref, tol, f"{impl} output")
    testing.assert_close(s, s_ref, tol, f"{impl} final state")
    for i, (d, d_ref) in enumerate(zip(grads, g_ref)):
        assert np.all(np.isfinite(np.asarray(d, np.float32))), f"{impl}: gradient {i} not finite"
        testing.assert_close(d, d_ref, 10 * tol, f"{impl} gradient {i}")


@pytest.mark.parametrize("impl", ["xla", "pallas_triton", "pallas_tpu"])
@pytest.mark.parametrize("per_channel", [False, True], ids=["scalar", "channel"])
def test_linear_attention(impl, per_channel):
    q, k, v, g, s0 = _inputs(40, 2, 16, 16, F32, per_channel)
    _check(_la, impl, (q, k, v, g, s0), 1e-4, chunk_size=16)


def test_linear_attention_mosaic_gpu_bf16():
    q, k, v, g, s0 = _inputs(70, 1, 64, 64, jnp.bfloat16, resets=(5, 40, 41))
    _check(_la, "pallas_mosaic_gpu", (q, k, v, g, s0), 1e-2, chunk_size=64)


@pytest.mark.parametrize("impl", ["xla", "pallas_triton", "pallas_tpu"])
def test_gated_delta_rule(impl):
    q, k, v, g, s0 = _inputs(40, 2, 16, 16, F32)
    beta = jax.random.uniform(jax.random.key(7), (1, 40, 2), F32, 0.1, 0.9)

    def fn(q, k, v, beta, g, s0, **kw):
        return gated_delta_rule(q, k, v, beta, g, initial_state=s0, **kw)

    _check(fn, impl, (q, k, v, beta, g, s0), 1e-4, chunk_size=16)


def _la(q, k, v, g, s0, **kw):
    return linear_attention(q, k, v, g, initial_state=s0, **kw)
