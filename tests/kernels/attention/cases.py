"""The case tables of ``attention`` and ``decode_attention``, their inputs and their check
against the float32 oracle (``implementation="naive"``), run over every implementation by
``test_attention.py`` and ``test_decode_attention.py``."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from seqmix import testing
from seqmix.kernels import attention, decode_attention

from .. import harness

TRITON, TPU, XLA = "pallas_triton", "pallas_tpu", "xla"
# Implementations that run every case natively under ``pytest -m gpu``.
GPU_IMPLEMENTATIONS = (TRITON, "cudnn")


@dataclasses.dataclass(frozen=True)
class Case:
    """``q [B, T, H, D]``, ``k, v [B, S, Hkv, D]``; ``segments``: None, ``"sorted"`` (packed
    sequences of random lengths), ``"random"`` (ids in any order: masked, not skipped), or
    ``"cross-sorted"`` / ``"cross-random"``: the same for queries and keys drawn apart
    (``kv_segment_ids``; ids that one side lacks leave rows without keys);
    ``cpu``: the implementations that run the case in CI; ``grad_tol``: a measured
    exception (with its reason at the case)."""

    name: str
    B: int
    T: int
    S: int
    H: int
    Hkv: int
    D: int
    dtype: str
    causal: bool = False
    window: int | tuple[int, int] | None = None
    segments: str | None = None
    softcap: float | None = None
    cpu: tuple[str, ...] = (XLA,)
    grad_tol: float | None = None


C = Case
F32, BF16, F16 = "float32", "bfloat16", "float16"
CASES = [
    # T not a block multiple, causal, GQA
    C("gqa-causal-T17", 2, 17, 17, 4, 2, 16, F32, causal=True, cpu=(XLA, TRITON)),
    C("gqa-causal-T17-bf16", 2, 17, 17, 4, 2, 16, BF16, causal=True, cpu=(XLA, TRITON)),
    # T = 1, MQA, a head dim below the Triton minimum (padded to 16)
    C("mqa-causal-T1-D8", 1, 1, 1, 2, 1, 8, F32, causal=True, cpu=(XLA, TRITON)),
    C("mqa-causal-T1-D8-bf16", 1, 1, 1, 2, 1, 8, BF16, causal=True),
    C("full-T33", 2, 33, 33, 4, 4, 32, F32, cpu=(XLA, TRITON)),
    C("full-T33-bf16", 2, 33, 33, 4, 4, 16, BF16),
    # GQA, a window and packed segments over many blocks
    C("gqa-window40-segments-T200", 1, 200, 200, 4, 2, 16, F32, True, 40, "sorted", cpu=(TRITON,)),
    C(
        "gqa-window40-segments-T200-bf16",
        *(1, 200, 200, 4, 2, 16, BF16, True, 40, "sorted"),
        cpu=(TRITON,),
    ),
    C("causal-softcap-T29", 2, 29, 29, 2, 2, 16, F32, True, softcap=5.0, cpu=(XLA, TRITON)),
    C("causal-softcap-T29-bf16", 2, 29, 29, 2, 2, 16, BF16, True, softcap=5.0, cpu=(XLA, TRITON)),
    C("S-longer-than-T", 1, 12, 30, 2, 1, 16, F32, cpu=(XLA, TRITON)),
    C("S-longer-than-T-bf16", 1, 12, 30, 2, 1, 16, BF16),
    # S < T: rows that see no key
    C("S-shorter-rows-without-keys", 1, 30, 12, 2, 1, 16, F32, True, (4, 0), cpu=(XLA, TRITON)),
    C(
        "S-shorter-rows-without-keys-bf16",
        1,
        30,
        12,
        2,
        1,
        16,
        BF16,
        True,
        (4, 0),
        cpu=(XLA, TRITON),
        # 12 keys, each summing a handful of bf16 products: over 200 seeds (Triton, interpret
        # mode) dk's error had median 2.9e-3 and maximum 4.3e-3, and one seed of another run
        # reached 5.02e-3, just above the bf16 tolerance of 5e-3
        grad_tol=1e-2,
    ),
    # a two-sided window over unsorted ids: blocks are masked, not skipped
    C(
        "two-sided-window-random-ids",
        1,
        40,
        40,
        4,
        2,
        16,
        F32,
        False,
        (7, 3),
        "random",
        cpu=(TRITON,),
    ),
    C("mqa-causal-window5", 1, 40, 40, 4, 1, 16, F32, True, 5),
    C("mqa-causal-window5-bf16", 1, 40, 40, 4, 1, 16, BF16, True, 5),
    C("two-sided-window-3-7", 1, 40, 40, 2, 1, 16, F32, False, (3, 7)),
    C("two-sided-window-3-7-bf16", 1, 40, 40, 2, 1, 16, BF16, False, (3, 7)),
    C("gqa-causal-window8-segments", 2, 50, 50, 4, 2, 16, F32, True, 8, "sorted"),
    C("gqa-causal-window8-segments-bf16", 2, 50, 50, 4, 2, 16, BF16, True, 8, "sorted"),
    C("D64-fp16", 1, 48, 48, 2, 1, 64, F16, True, cpu=(TRITON,)),
    C("D24-not-a-power-of-two", 1, 20, 20, 2, 1, 24, F32, cpu=(TRITON,)),
    # T = 1: p = 1, so dq and dk are dlse * k * scale (resp. q) plus do.v - do.o, which
    # cancels to float32 roundoff of |do| |v| (~1e-5 of it). When the random dlse is small
    # the relative error grows as 1 / |dlse|: 1.1e-4 for seed 1528244447 (|dlse| = 0.04, a CI
    # run of the TPU kernel), 1e-5 to 1.5e-5 for 2 of 29 other seeds. 5e-4 fails only for
    # |dlse| < ~0.01 (p ~ 5e-5).
    C("T1-D128", 1, 1, 1, 2, 1, 128, F32, True, cpu=(TPU,), grad_tol=5e-4),
    C(
        "causal-softcap-gqa-T17-D128-bf16",
        1,
        17,
        17,
        4,
        2,
        128,
        BF16,
        True,
        softcap=5.0,
        cpu=(TPU,),
    ),
    C(
        "gqa-window70-segments-T200-D128-bf16",
        2,
        200,
        200,
        2,
        1,
        128,
        BF16,
        True,
        70,
        "sorted",
        cpu=(TPU,),
    ),
    C(
        "two-sided-window-D64-S300-softcap",
        1,
        200,
        300,
        2,
        1,
        64,
        F32,
        False,
        (100, 30),
        softcap=5.0,
        cpu=(TPU,),
    ),
    C("mqa-full-D128-fp16", 1, 200, 200, 4, 1, 128, F16, cpu=(TPU,)),
    C("D256-segments-noncausal", 1, 17, 17, 2, 2, 256, F32, segments="sorted", cpu=(TPU,)),
    # rows t >= 155 see no key: o = 0, lse = -inf, finite gradients; whole q blocks see none
    # separate key ids (one block of a packed sequence against another), S != T
    C(
        "cross-segments-T40-S72",
        2,
        40,
        72,
        4,
        2,
        16,
        F32,
        segments="cross-sorted",
        cpu=(XLA, TRITON),
    ),
    C("cross-segments-T40-S72-bf16", 2, 40, 72, 4, 2, 16, BF16, segments="cross-sorted"),
    C(
        "cross-segments-random-window-T150-S200",
        *(1, 150, 200, 2, 1, 64, F32, False, (60, 20), "cross-random"),
        cpu=(TRITON, TPU),
    ),
    C(
        "cross-segments-T136-S264-D128",
        1,
        136,
        264,
        2,
        1,
        128,
        F32,
        segments="cross-sorted",
        cpu=(TPU,),
    ),
    C("rows-without-keys-D128", 1, 200, 150, 2, 1, 128, F32, False, (5, 0), cpu=(TPU,)),
]


def inputs(case: Case, seed: int):
    """``(q, k, v, segment_ids or None)`` for ``case``, fresh for each seed."""
    ks = jax.random.split(jax.random.key(seed), 4)
    dtype = jnp.dtype(case.dtype)
    q = jax.random.normal(ks[0], (case.B, case.T, case.H, case.D), jnp.float32).astype(dtype)
    k = jax.random.normal(ks[1], (case.B, case.S, case.Hkv, case.D), jnp.float32).astype(dtype)
    v = jax.random.normal(ks[2], (case.B, case.S, case.Hkv, case.D), jnp.float32).astype(dtype)
    seg = None
    if case.segments in ("sorted", "cross-sorted"):
        seg = jnp.sort(jax.random.randint(ks[3], (case.B, case.T), 0, 4), axis=1)
    elif case.segments in ("random", "cross-random"):
        seg = jax.random.randint(ks[3], (case.B, case.T), 0, 3)
    return q, k, v, seg


def kv_segment_ids(case: Case, seed: int):
    """The keys' ids ``[B, S]`` of a ``"cross-*"`` case (None otherwise)."""
    if case.segments is None or not case.segments.startswith("cross"):
        return None
    key = jax.random.fold_in(jax.random.key(seed), 1)
    if case.segments == "cross-sorted":
        return jnp.sort(jax.random.randint(key, (case.B, case.S), 0, 4), axis=1)
    return jax.random.randint(key, (case.B, case.S), 0, 3)


def check(case: Case, implementation: str) -> None:
    """Outputs (o and, where the implementation returns it, lse) and dq, dk, dv of
    ``implementation`` against the float32 oracle on fresh inputs."""
    seed = testing.fresh_seed()
    q, k, v, seg = inputs(case, seed)
    kw = dict(
        causal=case.causal,
        local_window_size=case.window,
        segment_ids=seg,
        kv_segment_ids=kv_segment_ids(case, seed),
        softcap=case.softcap,
        return_lse=implementation != "cudnn",  # cuDNN's lse has no gradient
    )
    harness.compare(
        jax.jit(lambda q, k, v: attention(q, k, v, implementation=implementation, **kw)),
        jax.jit(lambda q, k, v: attention(q, k, v, implementation="naive", **kw)),
        (q, k, v),
        argnums=(0, 1, 2),
        names="qkv",
        tol=testing.tolerance(case.dtype),
        grad_tol=case.grad_tol,
        seed=seed,
    )


@dataclasses.dataclass(frozen=True)
class DecodeCase:
    """``q [B, H, D]``, caches ``[B, S, Hkv, D]``, ``lengths`` per row (S is not a multiple
    of any block)."""

    name: str
    B: int
    S: int
    H: int
    Hkv: int
    D: int
    dtype: str
    softcap: float | None
    lengths: tuple[int, ...]
    cpu: tuple[str, ...] = (XLA, TRITON, TPU)


DECODE_CASES = [
    DecodeCase("gqa4-lengths-0-1-S300", 4, 300, 8, 2, 64, F32, None, (0, 1, 300, 157)),
    DecodeCase("mqa-softcap-bf16", 3, 200, 4, 1, 128, BF16, 20.0, (200, 37, 129)),
    # a row of length 0 and a head dim the Triton decoder does not take (it needs >= 16)
    DecodeCase("zero-length-D8", 2, 16, 4, 1, 8, F32, None, (16, 0), cpu=(XLA,)),
]


def decode_inputs(case: DecodeCase, seed: int):
    """``(q, k_cache, v_cache, lengths)`` for ``case``."""
    ks = jax.random.split(jax.random.key(seed), 3)
    dtype = jnp.dtype(case.dtype)
    q = jax.random.normal(ks[0], (case.B, case.H, case.D), jnp.float32).astype(dtype)
    shape = (case.B, case.S, case.Hkv, case.D)
    k = jax.random.normal(ks[1], shape, jnp.float32).astype(dtype)
    v = jax.random.normal(ks[2], shape, jnp.float32).astype(dtype)
    return q, k, v, jnp.array(case.lengths, jnp.int32)


def check_decode(case: DecodeCase, implementation: str) -> None:
    """The output and (through the VJP every decoder shares) dq, dk_cache, dv_cache of
    ``implementation`` against the float32 oracle."""
    seed = testing.fresh_seed()
    q, k, v, lengths = decode_inputs(case, seed)
    kw = dict(softcap=case.softcap)
    harness.compare(
        jax.jit(
            lambda q, k, v: decode_attention(q, k, v, lengths, implementation=implementation, **kw)
        ),
        jax.jit(lambda q, k, v: decode_attention(q, k, v, lengths, implementation="naive", **kw)),
        (q, k, v),
        argnums=(0, 1, 2),
        names=["q", "k_cache", "v_cache"],
        tol=testing.tolerance(case.dtype),
        seed=seed,
    )
