"""Times public ops at fixed shapes through nothing but their public signatures.

    PYTHONPATH=/path/to/tree python seqmix/experiments/device/time_ops.py --op=selective_scan \
        --out=/tmp/scan.json

The ops are imported from whichever seqmix is first on ``PYTHONPATH``, so the same script
times two trees of seqmix (``compare_revisions`` runs it for the ops in its ``DIRECT``)
whatever their benchmark modules look like. It imports only the op it times from
``seqmix.kernels`` (``selective_scan``, ``causal_conv1d``, ``attention``,
``linear_attention``, ``gated_delta_rule``, ``decode_attention``), with the arguments
every tree has taken. Each row: forward and forward+backward milliseconds (forward only for
decoding; ``median_ms``: the median of ``--iters`` repetitions of enqueued calls, after
warm-up) of each of ``--impls`` (default: the op's GPU kernels, ``IMPLS``) at the headline
shapes of BENCHMARKS.md, bf16 (``linear_attention_series``: the shapes and decays at which
auto dispatch chooses between the two linear-attention engines).
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp

SCAN_SHAPES = [(8, 4096, 1536, 16), (2, 16384, 1536, 16)]
CONV_SHAPES = [(8, 4096, 1536, 4), (2, 16384, 1536, 4)]
ATTENTION_SHAPES = [(8, 4096, 16, 128)]  # causal
LINEAR_ATTENTION_SHAPES = [(8, 4096, 16, 128)]  # scalar decay
# where auto dispatch chooses between the Triton and Mosaic GPU engines (B, T, H, D, decay)
LINEAR_ATTENTION_SERIES = [
    (1, 65536, 16, 128, "scalar"),
    (2, 16384, 16, 128, "scalar"),
    (8, 4096, 16, 64, "scalar"),
    (8, 4096, 16, 128, "channel"),
    (8, 4096, 16, 128, "none"),
    (8, 4096, 16, 128, "scalar"),
]
DELTA_RULE_SHAPES = [(8, 4096, 16, 128)]  # scalar decay
DECODE_SHAPES = [(4, 131072, 32, 8, 128)]  # B, cache, query heads, KV heads, D
IMPLS = {
    "decode_attention": "pallas_triton,cudnn",
    "selective_scan": "pallas_triton,xla",
    "causal_conv1d": "pallas_triton",
    "attention": "pallas_triton,cudnn",
    "linear_attention": "pallas_triton,pallas_mosaic_gpu",
    "linear_attention_series": "pallas_triton,pallas_mosaic_gpu",
    "gated_delta_rule": "pallas_triton",
}


def median_ms(fn, args, iters: int, target_s: float = 0.1) -> float:
    """Median over ``iters`` repetitions of the time per call of ``n`` calls enqueued back to
    back and waited for once (``n``: enough calls for ~``target_s``, 1 to 200), so that
    launch and synchronisation costs do not swamp sub-millisecond ops."""
    jax.block_until_ready(fn(*args))
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    n = max(1, min(200, int(target_s / max(time.perf_counter() - start, 1e-6))))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        out = None
        for _ in range(n):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append(1e3 * (time.perf_counter() - start) / n)
    return sorted(times)[len(times) // 2]


def scan_case(B, T, Dm, N, impl):
    from seqmix.kernels import selective_scan

    ks = jax.random.split(jax.random.key(0), 9)
    bf = jnp.bfloat16
    args = (
        jax.random.normal(ks[0], (B, T, Dm), bf),
        (0.5 * jax.random.normal(ks[1], (B, T, Dm)) - 1.0).astype(bf),
        -jnp.exp(jax.random.uniform(ks[2], (Dm, N), jnp.float32, 0.0, 2.5)),
        jax.random.normal(ks[3], (B, T, 1, N), bf),
        jax.random.normal(ks[4], (B, T, 1, N), bf),
        jax.random.normal(ks[5], (Dm,), jnp.float32),
        jax.random.normal(ks[6], (B, T, Dm), bf),
        0.5 * jax.random.normal(ks[7], (Dm,), jnp.float32),
    )
    dy = jax.random.normal(ks[8], (B, T, Dm), bf)

    def f(u, delta, A, Bm, Cm, D, z, bias):
        return selective_scan(
            u, delta, A, Bm, Cm, D, z, delta_bias=bias, delta_softplus=True, implementation=impl
        )

    return f"{B}x{T}x{Dm}x{N}", f, args, dy


def conv_case(B, T, C, W, impl):
    from seqmix.kernels import causal_conv1d

    ks = jax.random.split(jax.random.key(0), 4)
    args = (
        jax.random.normal(ks[0], (B, T, C), jnp.bfloat16),
        0.5 * jax.random.normal(ks[1], (W, C), jnp.float32),
        jax.random.normal(ks[2], (C,), jnp.float32),
    )
    dy = jax.random.normal(ks[3], (B, T, C), jnp.bfloat16)

    def f(x, w, b):
        return causal_conv1d(x, w, b, activation="silu", implementation=impl)

    return f"{B}x{T}x{C} w{W}", f, args, dy


def attention_case(B, T, H, D, impl):
    from seqmix.kernels import attention

    ks = jax.random.split(jax.random.key(0), 4)
    args = tuple(jax.random.normal(kk, (B, T, H, D), jnp.bfloat16) for kk in ks[:3])
    dy = jax.random.normal(ks[3], (B, T, H, D), jnp.bfloat16)

    def f(q, k, v):
        return attention(q, k, v, causal=True, implementation=impl)

    return f"{B}x{T}x{H}x{D} causal", f, args, dy


def linear_attention_case(B, T, H, D, impl, decay="scalar"):
    from seqmix.kernels import linear_attention

    ks = jax.random.split(jax.random.key(0), 5)
    qkv = tuple(jax.random.normal(kk, (B, T, H, D), jnp.bfloat16) for kk in ks[:3])
    dy = jax.random.normal(ks[4], (B, T, H, D), jnp.bfloat16)
    if decay == "none":

        def f(q, k, v):
            return linear_attention(q, k, v, chunk_size=64, implementation=impl)

        return f"{B}x{T}x{H}x{D} no decay", f, qkv, dy
    shape = (B, T, H) if decay == "scalar" else (B, T, H, D)
    g = -jnp.exp(jax.random.normal(ks[3], shape, jnp.float32) - 3.0)

    def f(q, k, v, g):
        return linear_attention(q, k, v, g, chunk_size=64, implementation=impl)

    return f"{B}x{T}x{H}x{D} {decay} decay", f, (*qkv, g), dy


def linear_attention_series_case(B, T, H, D, decay, impl):
    return linear_attention_case(B, T, H, D, impl, decay)


def delta_rule_case(B, T, H, D, impl):
    from seqmix.kernels import gated_delta_rule

    ks = jax.random.split(jax.random.key(0), 6)
    q, k, v = (jax.random.normal(kk, (B, T, H, D), jnp.bfloat16) for kk in ks[:3])
    k = (k / jnp.linalg.norm(k.astype(jnp.float32), axis=-1, keepdims=True)).astype(k.dtype)
    beta = jax.random.uniform(ks[3], (B, T, H), jnp.float32)
    g = -jnp.exp(jax.random.normal(ks[4], (B, T, H), jnp.float32) - 3.0)
    dy = jax.random.normal(ks[5], (B, T, H, D), jnp.bfloat16)

    def f(q, k, v, beta, g):
        return gated_delta_rule(q, k, v, beta, g, chunk_size=64, implementation=impl)

    return f"{B}x{T}x{H}x{D} scalar decay", f, (q, k, v, beta, g), dy


def decode_case(B, S, H, Hkv, D, impl):
    from seqmix.kernels import decode_attention

    ks = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(ks[0], (B, H, D), jnp.bfloat16)
    cache = tuple(jax.random.normal(kk, (B, S, Hkv, D), jnp.bfloat16) for kk in ks[1:])
    lengths = jnp.full((B,), S - 1000, jnp.int32)

    def f(q, k, v):
        return decode_attention(q, k, v, lengths, implementation=impl)

    return f"{B}x{S} cache {H}/{Hkv} heads", f, (q, *cache), None


CASES = {
    "decode_attention": (DECODE_SHAPES, decode_case),
    "selective_scan": (SCAN_SHAPES, scan_case),
    "causal_conv1d": (CONV_SHAPES, conv_case),
    "attention": (ATTENTION_SHAPES, attention_case),
    "linear_attention": (LINEAR_ATTENTION_SHAPES, linear_attention_case),
    "linear_attention_series": (LINEAR_ATTENTION_SERIES, linear_attention_series_case),
    "gated_delta_rule": (DELTA_RULE_SHAPES, delta_rule_case),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--op", choices=sorted(CASES), required=True)
    parser.add_argument("--out", required=True, help="JSON file for the rows")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--impls", default=None, help="comma-separated (default: IMPLS[op])")
    a = parser.parse_args()
    shapes, case = CASES[a.op]
    rows = []
    for shape in shapes:
        for impl in (a.impls or IMPLS[a.op]).split(","):
            label, f, args, dy = case(*shape, impl)
            row = {"label": label, "impl": impl}
            try:
                row["fwd_ms"] = median_ms(jax.jit(f), args, a.iters)
                if dy is not None:  # a decoding step has no backward here
                    floats = tuple(range(len(args)))
                    loss = lambda *xs: jnp.sum((f(*xs) * dy).astype(jnp.float32))
                    row["fb_ms"] = median_ms(jax.jit(jax.grad(loss, floats)), args, a.iters)
            except NotImplementedError as e:  # an implementation that does not serve it
                row["error"] = str(e)[:200]
            rows.append(row)
            print(row, flush=True)
            with open(a.out, "w") as fh:  # after every row: a time limit keeps what was measured
                json.dump({"op": a.op, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
