"""The case table of ``selective_scan``, its inputs and its check against the float32 oracle
(``implementation="naive"``), run over every implementation by ``test_selective_scan.py``:
outputs, final states and every gradient."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from seqmix import testing
from seqmix.kernels import selective_scan
from seqmix.kernels.selective_scan.tuning import TpuConfig, TritonConfig

from .. import harness

TRITON, TPU, XLA = "pallas_triton", "pallas_tpu", "xla"
GPU_IMPLEMENTATIONS = (TRITON,)
NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")
REQUIRED = ("u", "delta", "A", "B", "C")
ALL = ("D", "z", "delta_bias", "initial_state")


@dataclasses.dataclass(frozen=True)
class Case:
    """u, delta, z ``[B, T, Dm]``, A ``[Dm, N]``, B and C ``[B, T, G, N]`` (``[B, T, N]``
    when ``squeeze``); ``use``: the optional arguments given; ``strong``: A down to -20 with
    dt up to ~3 (decays near exp(-60) a step); ``grads``: also the VJP; ``configs``:
    implementation -> its tuning Config; ``cpu``: the implementations that run the case in
    CI."""

    name: str
    B: int
    T: int
    Dm: int
    N: int
    G: int
    dtype: str = "float32"
    use: tuple[str, ...] = ALL
    softplus: bool = True
    strong: bool = False
    squeeze: bool = False
    grads: bool = True
    configs: dict[str, Any] = dataclasses.field(default_factory=dict)
    cpu: tuple[str, ...] = (XLA,)


C = Case
BOTH = (TRITON, TPU)
LANES = TritonConfig(algorithm="lanes")
CASES = [
    C("groups-odd-T-all-args", 2, 13, 24, 4, 2, cpu=BOTH),
    C("T1-BTN-form-no-optional", 1, 1, 8, 3, 1, use=(), softplus=False, squeeze=True, cpu=BOTH),
    C(
        "bf16-strong-decay-z-D-state",
        1,
        11,
        16,
        4,
        1,
        "bfloat16",
        ("D", "z", "initial_state"),
        strong=True,
        cpu=BOTH,
    ),
    # T = 21 over chunks of 4 (ragged last chunk), 2 channel blocks per group of 16
    C(
        "chunks-of-4-channel-blocks",
        1,
        21,
        32,
        2,
        2,
        configs={TRITON: TritonConfig(chunk=4, block_d=8)},
        cpu=(TRITON,),
    ),
    # dt * A down to about -60 per step: the state decays to zero inside each chunk of 16
    C(
        "decay-to-zero-inside-a-chunk",
        1,
        37,
        8,
        4,
        1,
        strong=True,
        configs={TRITON: TritonConfig(chunk=16)},
        cpu=BOTH,
    ),
    # groups of 2048 channels split into two programs of 1024 lanes; dB/dC summed
    C(
        "several-slabs-per-group",
        1,
        3,
        4096,
        2,
        2,
        configs={TPU: TpuConfig(chunk=8, block_c=1024)},
        cpu=(TPU,),
    ),
    # dt * A down to about -60 per step over 300 steps: finite and equal to the oracle
    C("long-strong-decay-T300", 1, 300, 8, 2, 1, strong=True, grads=False, cpu=(TRITON,)),
    # the XLA form (associative scan): T in {1, 17}, B/C per group or shared, with and
    # without the z gate
    *(
        C(
            f"T{T}-{'BTN' if G is None else f'G{G}'}-{'gated' if z else 'ungated'}",
            2,
            T,
            8,
            4,
            G or 1,
            use=("D", "z", "delta_bias", "initial_state")
            if z
            else ("D", "delta_bias", "initial_state"),
            squeeze=G is None,
        )
        for T in (1, 17)
        for G in (None, 1, 2)
        for z in (False, True)
    ),
    C("bf16-strong-decay-no-optional", 2, 33, 8, 4, 2, "bfloat16", (), strong=True),
    # The lanes kernels on the training path (outputs and gradients from their forward with
    # checkpoints and their backward). T = 37: 2 time segments of 5 chunks of 4 (chained
    # start states and end adjoints), the last one ragged; 2 channel blocks per group.
    C(
        "lanes-segments-groups-ragged-T-all-args",
        1,
        37,
        32,
        4,
        2,
        configs={TRITON: LANES},
        cpu=(TRITON,),
    ),
    # bf16, the [B, T, N] form with N = 3 (padded to 4), decays near exp(-60) a step
    C(
        "lanes-bf16-strong-decay-z-D-state",
        2,
        11,
        16,
        3,
        1,
        "bfloat16",
        ("D", "z", "initial_state"),
        strong=True,
        squeeze=True,
        configs={TRITON: LANES},
        cpu=(TRITON,),
    ),
    C(
        "lanes-T1-no-optional",
        1,
        1,
        8,
        2,
        1,
        use=(),
        softplus=False,
        configs={TRITON: LANES},
        cpu=(TRITON,),
    ),
]


def inputs(case: Case, seed: int) -> list:
    """``[u, delta, A, B, C, D, z, delta_bias, initial_state]`` (None where not used)."""
    ks = jax.random.split(jax.random.key(seed), 9)
    dtype = jnp.dtype(case.dtype)
    Bsz, T, Dm, N = case.B, case.T, case.Dm, case.N
    u = jax.random.normal(ks[0], (Bsz, T, Dm), jnp.float32).astype(dtype)
    delta = (0.5 * jax.random.normal(ks[1], (Bsz, T, Dm), jnp.float32)).astype(dtype)
    lo, hi = (2.0, 3.0) if case.strong else (-1.0, 1.0)  # A down to -20 with dt up to ~3
    A = -jnp.exp(jax.random.uniform(ks[2], (Dm, N), jnp.float32, lo, hi))
    bc_shape = (Bsz, T, N) if case.squeeze else (Bsz, T, case.G, N)
    B = jax.random.normal(ks[3], bc_shape, jnp.float32).astype(dtype)
    C = jax.random.normal(ks[4], bc_shape, jnp.float32).astype(dtype)
    D = jax.random.normal(ks[5], (Dm,), jnp.float32)
    z = jax.random.normal(ks[6], (Bsz, T, Dm), jnp.float32).astype(dtype)
    bias = 0.5 * jax.random.normal(ks[7], (Dm,), jnp.float32) + (1.0 if case.strong else 0.0)
    h0 = jax.random.normal(ks[8], (Bsz, Dm, N), jnp.float32)
    args = [u, delta, A, B, C, D, z, bias, h0]
    return [a if n in REQUIRED or n in case.use else None for n, a in zip(NAMES, args)]


def _fn(case: Case, implementation: str, config=None):
    def f(u, delta, A, B, C, D, z, bias, h0):
        return selective_scan(
            u,
            delta,
            A,
            B,
            C,
            D,
            z,
            delta_bias=bias,
            delta_softplus=case.softplus,
            initial_state=h0,
            return_final_state=True,
            implementation=implementation,
            config=config,
        )

    return f


def check(case: Case, implementation: str) -> None:
    """y, the final state and (with ``grads``) every gradient of ``implementation`` against
    the float32 oracle on fresh inputs."""
    seed = testing.fresh_seed()
    args = inputs(case, seed)
    fn = _fn(case, implementation, case.configs.get(implementation))
    ref = _fn(case, "naive")
    tol = testing.tolerance(case.dtype)
    if not case.grads:
        with harness.mode():
            y, h = harness.skip_unserved(jax.jit(fn), *args)
        y_ref, h_ref = jax.jit(ref)(*testing.upcast(args))
        testing.assert_close(y, y_ref, tol, f"y (seed {seed})")
        testing.assert_close(h, h_ref, tol, f"final state (seed {seed})")
        return
    argnums = [i for i, a in enumerate(args) if a is not None]
    harness.compare(
        jax.jit(fn),
        jax.jit(ref),
        args,
        argnums=argnums,
        names=[NAMES[i] for i in argnums],
        tol=tol,
        seed=seed,
        fast_compile=True,
    )
