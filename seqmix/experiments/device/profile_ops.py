"""Where an op's time goes on a GPU: the longest-running device kernels of its forward and
forward+backward at a benchmark shape, from a ``jax.profiler`` trace of three calls.

    python -m seqmix.experiments.device.profile_ops [--ops=gated_delta_rule,selective_scan]

Ops (each at its first benchmark shape, bf16, through the public op with
``implementation="pallas_triton"`` unless named otherwise):

  gated_delta_rule        [8, 4096, 16, 128], scalar decay
  selective_scan          [8, 4096, 1536, 16], softplus, D and z
  linear_attention_mgpu   [8, 4096, 16, 128], scalar decay, ``pallas_mosaic_gpu``
  attention               [8, 4096, 16, 128], causal

Writes ``$OUT/profile_ops.json`` (every op's top kernels) and prints one table per op: the
kernel, its total ms over the three calls and its share of the traced GPU time.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time

from absl import app, flags

_OPS = flags.DEFINE_list(
    "ops", ["gated_delta_rule", "selective_scan", "linear_attention_mgpu"], "Ops to profile."
)
_TOP = flags.DEFINE_integer("top", 12, "Kernels listed per op and pass.")
_SMALL = flags.DEFINE_bool(
    "small", False, "Tiny shapes, Pallas in interpret mode: a dry run on a CPU."
)


def _shape(B, T):
    return (1, 128) if _SMALL.value else (B, T)


def _gated_delta_rule():
    from seqmix.experiments.bench import gated_delta_rule as bench
    from seqmix.kernels import gated_delta_rule

    q, k, v, beta, g, _ = bench.inputs(*_shape(8, 4096), 16, 128)

    def f(q, k, v, beta, g):
        return gated_delta_rule(q, k, v, beta, g, implementation="pallas_triton")

    return f, (q, k, v, beta, g), (0, 1, 2, 3, 4)


def _selective_scan():
    from seqmix.experiments.bench import selective_scan as bench

    args, _ = bench.inputs(*_shape(8, 4096), 1536 // (8 if _SMALL.value else 1), 16)
    return bench.scan_fn("pallas_triton"), args, tuple(range(len(args)))


def _linear_attention_mgpu():
    import jax
    import jax.numpy as jnp

    from seqmix.kernels import linear_attention

    (B, T), H, D = _shape(8, 4096), 16, 128
    ks = jax.random.split(jax.random.key(0), 4)
    q, k, v = (jax.random.normal(x, (B, T, H, D)).astype(jnp.bfloat16) for x in ks[:3])
    g = jax.nn.log_sigmoid(jax.random.normal(ks[3], (B, T, H))) / 16

    def f(q, k, v, g):
        return linear_attention(q, k, v, g, implementation="pallas_mosaic_gpu")

    return f, (q, k, v, g), (0, 1, 2, 3)


def _attention():
    import jax
    import jax.numpy as jnp

    from seqmix.kernels import attention

    (B, T), H, D = _shape(8, 4096), 16, 128
    ks = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(x, (B, T, H, D)).astype(jnp.bfloat16) for x in ks)

    def f(q, k, v):
        return attention(q, k, v, causal=True, implementation="pallas_triton")

    return f, (q, k, v), (0, 1, 2)


OPS = {
    "attention": _attention,
    "gated_delta_rule": _gated_delta_rule,
    "selective_scan": _selective_scan,
    "linear_attention_mgpu": _linear_attention_mgpu,
}


def _fwd_bwd(f, argnums):
    import jax
    import jax.numpy as jnp

    def loss(*args):
        out = f(*args)
        out = out[0] if isinstance(out, tuple) else out
        return jnp.sum(out.astype(jnp.float32) * jnp.cos(out.astype(jnp.float32)))

    return jax.grad(loss, argnums=argnums)


def profile(fn, args, top: int) -> dict:
    """Compiles ``fn``, traces three calls and returns their top device kernels."""
    import contextlib

    import jax

    from seqmix.experiments.device.recall_probe import top_ops
    from seqmix.kernels import interpret

    jitted = jax.jit(fn)
    mode = interpret() if _SMALL.value else contextlib.nullcontext()
    trace_dir = tempfile.mkdtemp(prefix="profile_ops_")
    try:
        with mode:
            jax.block_until_ready(jitted(*args))  # compile and warm up
            t0 = time.perf_counter()
            jax.block_until_ready(jitted(*args))
            one_call_ms = 1e3 * (time.perf_counter() - t0)
            with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
                for _ in range(3):
                    jax.block_until_ready(jitted(*args))
        ops = top_ops(trace_dir, k=top)
    finally:
        shutil.rmtree(trace_dir, ignore_errors=True)
    return {"one_call_ms": one_call_ms, "top": ops}


def main(argv):
    del argv
    rows = {}
    for name in _OPS.value:
        if name not in OPS:
            raise ValueError(f"--ops: unknown op {name!r}; choose from {sorted(OPS)}")
        f, args, argnums = OPS[name]()
        rows[name] = {}
        for what, fn in (("fwd", f), ("fwd_bwd", _fwd_bwd(f, argnums))):
            try:
                rows[name][what] = profile(fn, args, _TOP.value)
            except Exception as e:  # noqa: BLE001 (one op failing keeps the others)
                rows[name][what] = {"error": f"{type(e).__name__}: {e}"[:500]}
            out = os.environ.get("OUT")
            if out:
                os.makedirs(out, exist_ok=True)
                with open(os.path.join(out, "profile_ops.json"), "w") as fh:
                    json.dump(rows, fh, indent=1, default=str)
    for name, passes in rows.items():
        for what, r in passes.items():
            print(
                f"\n## {name} {what}: " + (r.get("error") or f"one call {r['one_call_ms']:.2f} ms")
            )
            ops = r.get("top", [])
            busy = sum(ms for _, ms, _ in ops) or 1.0
            print("| kernel | ms (3 calls) | calls | share of listed |")
            print("| --- | --- | --- | --- |")
            for kernel, ms, count in ops:
                print(f"| {kernel[:80]} | {ms:.2f} | {count} | {ms / busy:.0%} |")


if __name__ == "__main__":
    app.run(main)
