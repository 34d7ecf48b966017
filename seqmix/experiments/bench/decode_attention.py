"""Decoding attention over a KV cache: every implementation side by side, one run.

    python -m seqmix.experiments.bench_kernels --op=decode_attention [--quick]
    python -m seqmix.experiments.bench_kernels --op=decode_attention --tune --tuning_out=t.json

One query per row over a full KV cache, B = 4, 32 query heads, 8 KV heads, D = 128, bf16,
cache 128k (and 8k, 1M unless quick): seqmix ``pallas_triton``, ``cudnn``, ``xla`` and jax's
Pallas ``gqa`` decoder, reporting KV-cache bytes read per second against the copy ceiling.
Rows record the relative error of the output against ``xla``. ``--tune`` runs the
autotuner over the Triton decoder's ``decode_attention.tuning.SEARCH`` at a 128k cache.
``SEQMIX_BENCH_FILTER=<substring>`` keeps only the shapes whose label contains it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from seqmix.experiments.bench import common

DTYPE = jnp.bfloat16

DECODE = dict(B=4, H=32, Hkv=8, D=128)


def decode_shapes(quick: bool) -> list[dict]:
    lengths = (131072,) if quick else (8192, 131072, 1048576)
    return common.filtered(
        [
            dict(
                label=f"{DECODE['B']}x{S} h{DECODE['H']}/{DECODE['Hkv']} d{DECODE['D']}",
                S=S,
                **DECODE,
            )
            for S in lengths
        ]
    )


def _seqmix_decode(impl):
    from seqmix.kernels import decode_attention

    return lambda q, k, v, lengths: decode_attention(q, k, v, lengths, implementation=impl)


def _jax_gqa(q, k, v, lengths):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from jax.experimental.pallas.ops.gpu import decode_attention as jax_decode
    return jax_decode.gqa(q, k, v, kv_seq_len=lengths, sm_scale=q.shape[-1] ** -0.5)


DECODE_IMPLS = {
    "xla": _seqmix_decode("xla"),
    "pallas_triton": _seqmix_decode("pallas_triton"),
    "cudnn": _seqmix_decode("cudnn"),
    "jax_gqa": _jax_gqa,
}


def run(quick: bool, ceilings: dict) -> tuple[list[dict], list[str]]:
    """Rows and the columns to print."""
    rows = common.new_rows()
    copy = ceilings.get("copy_tbps")
    for s in decode_shapes(quick):
        B, S, H, Hkv, D = s["B"], s["S"], s["H"], s["Hkv"], s["D"]
        kq, kk, kv = jax.random.split(jax.random.key(0), 3)
        q = jax.random.normal(kq, (B, H, D), DTYPE)
        k = jax.random.normal(kk, (B, S, Hkv, D), DTYPE)
        v = jax.random.normal(kv, (B, S, Hkv, D), DTYPE)
        lengths = jnp.full((B,), S, jnp.int32)
        kv_bytes = 2 * B * S * Hkv * D * jnp.dtype(DTYPE).itemsize
        ref = None
        for name, impl in DECODE_IMPLS.items():
            row = {"impl": name, **s, "kv_gb": kv_bytes / 1e9}
            fn = jax.jit(impl)
            out = common.attempt(row, "decode", lambda: fn(q, k, v, lengths))
            if out is not None:
                t = common.attempt(row, "decode", lambda: common.time_jax(fn, q, k, v, lengths))
                if t is not None:
                    row.update(ms=t * 1e3, kv_tbps=kv_bytes / t / 1e12)
                    if copy:
                        row["of_copy"] = row["kv_tbps"] / copy
                if name == "xla":
                    ref = out
                elif ref is not None:
                    row["err_o"] = common.rel_err(out, ref)
            print({key: row.get(key) for key in DECODE_COLUMNS}, flush=True)
            rows.append(row)
            del out
        k = v = None  # free the caches before the next shape allocates
    return rows, DECODE_COLUMNS


DECODE_COLUMNS = ["label", "impl", "ms", "kv_tbps", "of_copy", "err_o", "error"]


def _cache(s: dict):
    B, S, H, Hkv, D = s["B"], s["S"], s["H"], s["Hkv"], s["D"]
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(kq, (B, H, D), DTYPE)
    k = jax.random.normal(kk, (B, S, Hkv, D), DTYPE)
    v = jax.random.normal(kv, (B, S, Hkv, D), DTYPE)
    return q, k, v, jnp.full((B,), S, jnp.int32)


def tune(quick: bool, out: str | None) -> list:
    """Autotunes the Triton decoder at a 128k cache; returns its ``tune.Result``."""
    from seqmix.kernels import decode_attention

    shapes = [s for s in decode_shapes(True)]
    return [
        common.autotune(
            decode_attention,
            _cache(s),
            implementation="pallas_triton",
            out=out,
            shape=s["label"],
        )
        for s in shapes
    ]
