"""What exact NaN/Inf masking costs the chunked kernels, in one process per op (GPU).

    python -m seqmix.experiments.device.masking_cost [--ops=linear_attention,...] [--out=F]

For each kernel (``linear_attention`` on pallas_triton and pallas_mosaic_gpu,
``gated_delta_rule`` on pallas_triton) at [8, 4096, 16, 128] bf16, scalar decay, one
sequence, it times forward and forward+backward (``time_ops.median_ms``) of:

  unmasked        the kernel alone (no NaN handling: the floor, not exact);
  eager           ``masks_nonfinite``: zero the bad entries, run, mark the reached rows,
                  on every call;
  shipped         the op as shipped (``masks_nonfinite_if_poisoned``: the kernel on the
                  inputs as given, the masked path only for a non-finite final state; for
                  the delta rule under differentiation, the eager path);
  cond both ways  (delta rule) the decision in the backward too, the whole backward
                  inside the cond's branches, as linear attention ships it.

Prints a table last; rows go to ``--out`` (JSON) as they come.
"""

from __future__ import annotations

import argparse
import importlib
import json

import jax
import jax.numpy as jnp
from jax import lax

from seqmix.experiments.device.time_ops import median_ms

SHAPE = [8, 4096, 16, 128]
KERNELS = [
    ("linear_attention", "pallas_triton"),
    ("linear_attention", "pallas_mosaic_gpu"),
    ("gated_delta_rule", "pallas_triton"),
]


def _reference(op: str):
    package = "linear_attention" if op == "linear_attention" else "delta_rule"
    return importlib.import_module(f"seqmix.kernels.{package}.reference")


def vjp_in_cond(fast, clean, mark):
    """The decision of ``unless_poisoned`` with each backward inside the cond's branches."""

    def exact(*args):
        clean_args, hit = clean(*args)
        return mark(*fast(*clean_args), hit)

    def poisoned(final):
        return jnp.logical_not(jnp.all(jnp.isfinite(final)))

    @jax.custom_vjp
    def f(*args):
        o, final = fast(*args)
        return lax.cond(poisoned(final), lambda: exact(*args), lambda: (o, final))

    def fwd(*args):
        (o, final), fast_vjp = jax.vjp(fast, *args)
        bad = poisoned(final)
        return lax.cond(bad, lambda: exact(*args), lambda: (o, final)), (bad, fast_vjp, args)

    def bwd(res, cot):
        bad, fast_vjp, args = res
        return lax.cond(bad, lambda: jax.vjp(exact, *args)[1](cot), lambda: fast_vjp(cot))

    f.defvjp(fwd, bwd)
    return f


def variants(op: str, impl: str):
    """name -> ``f(*arrays) -> (o, final)`` on the normalised arguments."""
    package = "linear_attention" if op == "linear_attention" else "delta_rule"
    module = importlib.import_module(f"seqmix.kernels.{package}.{impl.removeprefix('pallas_')}")
    if impl == "pallas_mosaic_gpu":
        module = importlib.import_module("seqmix.kernels.linear_attention.mosaic_gpu.engine")
    shipped = getattr(module, op)
    raw = shipped.__wrapped__
    ref = _reference(op)
    la = _reference("linear_attention")
    kw = dict(scale=SHAPE[3] ** -0.5, runs=None, chunk_size=64, config=None)

    def call(fn):
        def f(*arrays):
            *xs, s0 = arrays
            return fn(*xs, initial_state=s0, **kw)

        return f

    out = {
        "unmasked": call(raw),
        "eager": call(ref.masks_nonfinite(raw)),
        "shipped": call(shipped),
    }
    if op == "gated_delta_rule":  # linear attention ships this one
        out["cond both ways"] = vjp_in_cond(call(raw), ref.clean_nonfinite, la.mark_reached)
    return out


def inputs(op: str):
    B, T, H, D = SHAPE
    ks = jax.random.split(jax.random.key(0), 6)
    q, k, v = (jax.random.normal(kk, (B, T, H, D), jnp.bfloat16) for kk in ks[:3])
    g = -jnp.exp(jax.random.normal(ks[3], (B, T, H), jnp.float32) - 3.0)
    dy = jax.random.normal(ks[5], (B, T, H, D), jnp.bfloat16)
    if op == "linear_attention":
        return (q, k, v, g, None), dy
    k = (k / jnp.linalg.norm(k.astype(jnp.float32), axis=-1, keepdims=True)).astype(k.dtype)
    beta = jax.random.uniform(ks[4], (B, T, H), jnp.float32)
    return (q, k, v, beta, g, None), dy


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ops", default=",".join(f"{o}:{i}" for o, i in KERNELS))
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--out", default=None)
    parser.add_argument("--shape", default=None, help="B,T,H,D (default: SHAPE)")
    a = parser.parse_args()
    if a.shape:
        SHAPE[:] = [int(x) for x in a.shape.split(",")]
    rows = []
    for item in a.ops.split(","):
        op, impl = item.split(":")
        args, dy = inputs(op)
        for name, f in variants(op, impl).items():
            row = {"op": op, "impl": impl, "variant": name}
            try:
                fwd = jax.jit(lambda *xs, f=f: f(*xs)[0])
                row["fwd_ms"] = median_ms(fwd, args, a.iters)
                floats = tuple(i for i, x in enumerate(args) if x is not None)

                def loss(*xs, f=f):
                    return jnp.sum((f(*xs)[0] * dy).astype(jnp.float32))

                row["fb_ms"] = median_ms(jax.jit(jax.grad(loss, floats)), args, a.iters)
            except Exception as e:  # noqa: BLE001 - one variant failing must not stop the rest
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            rows.append(row)
            print(row, flush=True)
            if a.out:
                with open(a.out, "w") as fh:
                    kind = jax.devices()[0].device_kind
                    json.dump({"shape": SHAPE, "device": kind, "rows": rows}, fh, indent=1)
    print("| op | impl | variant | fwd ms | fwd+bwd ms |\n|---|---|---|---|---|")
    for r in rows:
        fwd, fb = r.get("fwd_ms"), r.get("fb_ms")
        cells = f"{fwd:.3f} | {fb:.3f}" if fb is not None else r.get("error", "")
        print(f"| {r['op']} | {r['impl']} | {r['variant']} | {cells} |")


if __name__ == "__main__":
    main()
