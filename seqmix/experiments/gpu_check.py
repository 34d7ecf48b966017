"""seqmix's GPU kernels against outside peers on the same inputs, on a GPU machine.

    python -m seqmix.experiments.gpu_check [--only=attention,linear_attention]

An independent check beside the test suite (whose ``pytest -m gpu`` compares every kernel
with seqmix's own float32 oracle): softmax attention (``pallas_triton``) against PyTorch's
``scaled_dot_product_attention``, and chunked linear attention (``pallas_triton`` and
``pallas_mosaic_gpu``) against flash-linear-attention's ``chunk_simple_gla`` (scalar decay)
and ``chunk_gla`` (per-channel decay), forward outputs in bf16. Prints one table; writes JSON to $OUT when set. A peer that
is not installed records its import error.
"""

from __future__ import annotations

import json
import os
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from seqmix import kernels as K
from seqmix.testing import relative_error

_ONLY = flags.DEFINE_list("only", [], "Ops to check (default: all).")

ROWS: list[dict] = []


def _record(op, impl, case, **vals):
    row = {"op": op, "impl": impl, "case": case, **vals}
    ROWS.append(row)
    print(json.dumps(row, default=str), flush=True)


def _normal(key, shape, dtype):
    return jax.random.normal(key, shape, jnp.float32).astype(dtype)


def _to_torch(x):
    import torch

    return torch.from_numpy(np.asarray(x.astype(jnp.float32))).cuda()


ATTENTION_CASES = [
    dict(B=2, T=1000, H=8, D=128, causal=True),
    dict(B=2, T=777, H=4, D=64, causal=False),
    dict(B=1, T=2048, H=8, D=128, causal=True),
]


def check_attention():
    """seqmix's Triton flash attention against PyTorch's SDPA (bf16, MHA)."""
    for i, c in enumerate(ATTENTION_CASES):
        case = f"bf16 B={c['B']} T={c['T']} H={c['H']} D={c['D']} causal={c['causal']}"
        try:
            import torch.nn.functional as F

            ks = jax.random.split(jax.random.key(i), 3)
            shape = (c["B"], c["T"], c["H"], c["D"])
            q, k, v = (_normal(key, shape, jnp.bfloat16) for key in ks)
            o = K.attention(q, k, v, causal=c["causal"], implementation="pallas_triton")
            tt = lambda x: _to_torch(x).bfloat16().transpose(1, 2)
            ot = F.scaled_dot_product_attention(tt(q), tt(k), tt(v), is_causal=c["causal"])
            ot = ot.transpose(1, 2).float().cpu().numpy()
            _record("attention", "pallas_triton vs torch sdpa", case, max_err=relative_error(o, ot))
        except Exception as e:  # noqa: BLE001 - one failure must not stop the check
            _record("attention", "pallas_triton vs torch sdpa", case, error=str(e)[:300])


LINEAR_ATTENTION_IMPLS = ("pallas_triton", "pallas_mosaic_gpu")


def check_linear_attention():
    """seqmix's chunked linear attention (the Triton and the Mosaic GPU engine) against
    flash-linear-attention's forward."""
    B, T, H, D = 2, 2048, 8, 128
    for decay in ("scalar", "channel"):
        case = f"bf16 {B}x{T}x{H}x{D} {decay}"
        try:
            from fla.ops.gla import chunk_gla
            from fla.ops.simple_gla import chunk_simple_gla

            ks = jax.random.split(jax.random.key(7), 4)
            q = _normal(ks[0], (B, T, H, D), jnp.bfloat16)
            k = _normal(ks[1], (B, T, H, D), jnp.bfloat16) * 0.1
            v = _normal(ks[2], (B, T, H, D), jnp.bfloat16)
            shape = (B, T, H) if decay == "scalar" else (B, T, H, D)
            g = jax.nn.log_sigmoid(jax.random.normal(ks[3], shape) + 3.0)
            fn = chunk_simple_gla if decay == "scalar" else chunk_gla
            ot, _ = fn(
                _to_torch(q).bfloat16(),
                _to_torch(k).bfloat16(),
                _to_torch(v).bfloat16(),
                _to_torch(g),
                scale=D**-0.5,
            )
            ot = ot.float().cpu().numpy()
        except Exception as e:  # noqa: BLE001 - no fla / torch on this machine
            _record("linear_attention", "fla", case, error=str(e)[:300])
            continue
        for impl in LINEAR_ATTENTION_IMPLS:
            try:
                o = K.linear_attention(q, k, v, g, implementation=impl)
                _record("linear_attention", f"{impl} vs fla", case, max_err=relative_error(o, ot))
            except Exception as e:  # noqa: BLE001
                _record(
                    "linear_attention",
                    f"{impl} vs fla",
                    case,
                    error=str(e)[:300],
                    trace=traceback.format_exc()[-600:],
                )


CHECKS = {"attention": check_attention, "linear_attention": check_linear_attention}


def main(argv):
    del argv
    print("device:", jax.devices()[0].device_kind, "jax", jax.__version__, flush=True)
    unknown = sorted(set(_ONLY.value) - set(CHECKS))
    if unknown:
        raise ValueError(f"--only: unknown ops {unknown}; expected some of {sorted(CHECKS)}")
    for name, fn in CHECKS.items():
        if not _ONLY.value or name in _ONLY.value:
            fn()
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "gpu_check.json"), "w") as f:
            json.dump(ROWS, f, indent=1, default=str)
    print("\n| op | peer | case | rel err | note |\n| --- | --- | --- | --- | --- |")
    for r in ROWS:
        err = r.get("max_err")
        print(
            f"| {r['op']} | {r['impl']} | {r['case']} | "
            f"{'' if err is None else f'{err:.2e}'} | {r.get('error', '')[:120]} |"
        )


if __name__ == "__main__":
    app.run(main)
