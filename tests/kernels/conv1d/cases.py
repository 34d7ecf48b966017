"""The case tables of ``causal_conv1d`` and ``causal_conv1d_step``, their inputs and their
check against the float32 oracle (``implementation="naive"``), run over every implementation
by ``test_causal_conv1d.py`` and ``test_causal_conv1d_step.py``."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from seqmix import testing
from seqmix.kernels import causal_conv1d, causal_conv1d_step

from .. import harness

TRITON, TPU, XLA = "pallas_triton", "pallas_tpu", "xla"
GPU_IMPLEMENTATIONS = (TRITON,)
NAMES = ("x", "weight", "bias", "initial_state")


@dataclasses.dataclass(frozen=True)
class Case:
    """x ``[B, T, C]`` in ``dtype``, weight ``[W, C]`` and bias ``[C]`` in ``param_dtype``,
    initial state ``[B, W - 1, C]``; ``cpu``: the implementations that run it in CI."""

    name: str
    B: int
    T: int
    C: int
    W: int
    dtype: str = "float32"
    bias: bool = True
    activation: str | None = None
    state: bool = True
    param_dtype: str = "float32"
    cpu: tuple[str, ...] = (XLA,)


BOTH = (TRITON, TPU)
CASES = [
    Case("w4-silu-bias-state-several-tiles", 2, 37, 24, 4, activation="silu", cpu=BOTH),
    Case("w5-T-shorter-than-history", 1, 2, 16, 5, bias=False, cpu=BOTH),
    Case(
        "w2-bf16-silu-bias-no-state",
        2,
        9,
        20,
        2,
        "bfloat16",
        activation="silu",
        state=False,
        cpu=BOTH,
    ),
    Case("w8-silu-state", 1, 13, 8, 8, bias=False, activation="silu", cpu=BOTH),
    # the XLA form (lax.conv), every argument in the input dtype
    *(
        Case(
            f"w{W}-T{T}-{act or 'linear'}-{dtype}",
            2,
            T,
            6,
            W,
            dtype,
            activation=act,
            param_dtype=dtype,
        )
        for W, T in ((2, 1), (4, 2), (4, 19), (8, 5))
        for act in (None, "silu")
        for dtype in ("float32", "bfloat16")
    ),
]


def inputs(case: Case, seed: int):
    """``(x, weight, bias or None, initial_state or None)``."""
    ks = jax.random.split(jax.random.key(seed), 4)
    dtype, pdtype = jnp.dtype(case.dtype), jnp.dtype(case.param_dtype)
    x = jax.random.normal(ks[0], (case.B, case.T, case.C), jnp.float32).astype(dtype)
    w = (0.5 * jax.random.normal(ks[1], (case.W, case.C), jnp.float32)).astype(pdtype)
    b = jax.random.normal(ks[2], (case.C,), jnp.float32).astype(pdtype) if case.bias else None
    h = None
    if case.state:
        h = jax.random.normal(ks[3], (case.B, case.W - 1, case.C), jnp.float32).astype(dtype)
    return x, w, b, h


def check(case: Case, implementation: str) -> None:
    """y, the final state and every gradient of ``implementation`` against the float32
    oracle on fresh inputs."""
    seed = testing.fresh_seed()
    args = inputs(case, seed)

    def run(impl):
        return lambda x, w, b, h: causal_conv1d(
            x,
            w,
            b,
            activation=case.activation,
            initial_state=h,
            return_final_state=True,
            implementation=impl,
        )

    argnums = [i for i, a in enumerate(args) if a is not None]
    harness.compare(
        jax.jit(run(implementation)),
        jax.jit(run("naive")),
        args,
        argnums=argnums,
        names=[NAMES[i] for i in argnums],
        tol=testing.tolerance(case.dtype),
        seed=seed,
    )


STEP_CASES = [
    Case("w4-silu-bias-state-T3", 3, 3, 20, 4, activation="silu", cpu=BOTH),
    *(Case(f"w{W}-silu-bias-T11", 2, 11, 5, W, activation="silu") for W in (2, 4)),
]


def check_step(case: Case, implementation: str) -> None:
    """T decoding steps of ``implementation`` from the initial state give the outputs and the
    final state of the full op's float32 oracle."""
    seed = testing.fresh_seed()
    x, w, b, h = inputs(case, seed)
    state, ys = h, []
    with harness.mode():
        step = jax.jit(
            lambda x, s, w, b: causal_conv1d_step(
                x, s, w, b, activation=case.activation, implementation=implementation
            )
        )
        for t in range(case.T):
            y, state = harness.skip_unserved(step, x[:, t], state, w, b)
            ys.append(y)
    y_ref, final_ref = causal_conv1d(
        x,
        w,
        b,
        activation=case.activation,
        initial_state=h,
        return_final_state=True,
        implementation="naive",
    )
    tol = testing.tolerance(case.dtype)
    testing.assert_close(jnp.stack(ys, axis=1), y_ref, tol, f"step outputs (seed {seed})")
    testing.assert_close(state, final_ref, tol, f"final state (seed {seed})")
