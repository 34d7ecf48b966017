"""Correctness of every GPU implementation on the device, against the oracle and peers.

    python -m seqmix.experiments.gpu_check [--only=attention,linear_attention,...]

For each op and each implementation available on the GPU: outputs and gradients against
the naive oracle (float32 inputs upcast, at moderate shapes) and, where a peer exists on the
machine, against it on the same inputs: PyTorch's scaled_dot_product_attention for softmax
attention, flash-linear-attention for linear attention. Prints one table; writes JSON to
$OUT when set. This is the "independent comparison" the kernel issues ask for.
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
from seqmix.testing import relative_error, vjp_pairs

_ONLY = flags.DEFINE_list("only", [], "Ops to check (default: all).")

ROWS: list[dict] = []


def _record(op, impl, case, **vals):
    row = {"op": op, "impl": impl, "case": case, **vals}
    ROWS.append(row)
    print(json.dumps(row), flush=True)


def _compare(op, impl, case, fn, ref, args, argnums):
    """fn/ref map args -> output pytree; compares outputs and VJPs for one cotangent."""
    try:
        outs, grads = vjp_pairs(jax.jit(fn), jax.jit(ref), args, argnums=argnums, seed=0)
        errs = {f"out{i}": relative_error(a, b) for i, (a, b) in enumerate(outs)}
        errs.update({f"d{i}": relative_error(a, b) for i, (a, b) in zip(argnums, grads)})
        finite = all(
            bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves([p[0] for p in outs + grads])
        )
        _record(op, impl, case, max_err=max(errs.values()), finite=finite, **errs)
    except Exception as e:  # noqa: BLE001 - one failure must not stop the check
        _record(
            op,
            impl,
            case,
            error=f"{type(e).__name__}: {e}"[:400],
            trace=traceback.format_exc()[-800:],
        )


def _normal(key, shape, dtype):
    return jax.random.normal(key, shape, jnp.float32).astype(dtype)


def check_attention():
    impls = ["pallas_triton", "cudnn", "xla"]
    cases = [
        dict(B=2, T=1000, H=8, Hkv=2, D=128, causal=True, window=None, seg=False, softcap=None),
        dict(B=2, T=777, H=4, Hkv=4, D=64, causal=False, window=None, seg=False, softcap=None),
        dict(B=1, T=2048, H=8, Hkv=2, D=128, causal=True, window=256, seg=True, softcap=None),
        dict(B=2, T=512, H=4, Hkv=1, D=256, causal=True, window=None, seg=False, softcap=30.0),
        dict(B=2, T=300, H=4, Hkv=2, D=64, causal=False, window=(64, 32), seg=False, softcap=None),
    ]
    for i, c in enumerate(cases):
        ks = jax.random.split(jax.random.key(i), 4)
        for dtype in (jnp.bfloat16, jnp.float32) if i == 0 else (jnp.bfloat16,):
            q = _normal(ks[0], (c["B"], c["T"], c["H"], c["D"]), dtype)
            k = _normal(ks[1], (c["B"], c["T"], c["Hkv"], c["D"]), dtype)
            v = _normal(ks[2], (c["B"], c["T"], c["Hkv"], c["D"]), dtype)
            seg = (
                jnp.sort(jax.random.randint(ks[3], (c["B"], c["T"]), 0, 4), axis=1)
                if c["seg"]
                else None
            )
            kw = dict(
                causal=c["causal"],
                local_window_size=c["window"],
                segment_ids=seg,
                softcap=c["softcap"],
            )
            name = f"{dtype.__name__} " + " ".join(f"{k}={v}" for k, v in c.items())
            ref = lambda q, k, v: K.attention(
                q.astype(jnp.float32),
                k.astype(jnp.float32),
                v.astype(jnp.float32),
                implementation="xla",
                **kw,
            )
            for impl in impls:
                _compare(
                    "attention",
                    impl,
                    name,
                    lambda q, k, v, impl=impl: K.attention(q, k, v, implementation=impl, **kw),
                    ref,
                    (q, k, v),
                    (0, 1, 2),
                )
        if i < 2:  # PyTorch's SDPA on the same bf16 inputs (no GQA/window in this call)
            _torch_sdpa_check(c, i)


def _torch_sdpa_check(c, i):
    try:
        import torch
        import torch.nn.functional as F

        ks = jax.random.split(jax.random.key(i), 3)
        q = _normal(ks[0], (c["B"], c["T"], c["H"], c["D"]), jnp.bfloat16)
        k = _normal(ks[1], (c["B"], c["T"], c["H"], c["D"]), jnp.bfloat16)
        v = _normal(ks[2], (c["B"], c["T"], c["H"], c["D"]), jnp.bfloat16)
        o = K.attention(q, k, v, causal=c["causal"], implementation="pallas_triton")
        tt = lambda x: (
            torch.from_numpy(np.asarray(x.astype(jnp.float32)))
            .cuda()
            .to(torch.bfloat16)
            .transpose(1, 2)
        )
        ot = F.scaled_dot_product_attention(tt(q), tt(k), tt(v), is_causal=c["causal"])
        ot = ot.transpose(1, 2).float().cpu().numpy()
        _record(
            "attention",
            "pallas_triton vs torch sdpa",
            f"bf16 B={c['B']} T={c['T']} H={c['H']} D={c['D']} causal={c['causal']}",
            max_err=relative_error(o, ot),
        )
    except Exception as e:  # noqa: BLE001
        _record("attention", "pallas_triton vs torch sdpa", "", error=str(e)[:300])


def check_decode():
    for S, lengths in ((4096, (4096, 1000, 1, 0)), (131072, (131072, 77777, 5000, 3))):
        ks = jax.random.split(jax.random.key(S), 3)
        q = _normal(ks[0], (4, 32, 128), jnp.bfloat16)
        kc = _normal(ks[1], (4, S, 8, 128), jnp.bfloat16)
        vc = _normal(ks[2], (4, S, 8, 128), jnp.bfloat16)
        ln = jnp.array(lengths, jnp.int32)
        ref = K.decode_attention(
            q.astype(jnp.float32),
            kc.astype(jnp.float32),
            vc.astype(jnp.float32),
            ln,
            implementation="xla",
        )
        for impl in ("pallas_triton", "cudnn", "xla"):
            try:
                o = jax.jit(
                    lambda q, k, v, impl=impl: K.decode_attention(q, k, v, ln, implementation=impl)
                )(q, kc, vc)
                _record(
                    "decode_attention",
                    impl,
                    f"S={S} lengths={lengths}",
                    max_err=relative_error(o, ref),
                    finite=bool(jnp.all(jnp.isfinite(o))),
                )
            except Exception as e:  # noqa: BLE001
                _record("decode_attention", impl, f"S={S}", error=str(e)[:400])


def check_linear_attention():
    cases = [
        dict(B=2, T=1000, Hqk=4, Hv=4, K=128, V=128, decay="scalar", seg=False, norm=False),
        dict(B=2, T=777, Hqk=2, Hv=8, K=64, V=64, decay="scalar", seg=True, norm=False),
        dict(B=1, T=1024, Hqk=4, Hv=4, K=128, V=128, decay="channel", seg=False, norm=False),
        dict(B=2, T=300, Hqk=4, Hv=4, K=64, V=64, decay="none", seg=False, norm=True),
        dict(B=1, T=513, Hqk=2, Hv=2, K=256, V=256, decay="channel", seg=True, norm=False),
    ]
    for i, c in enumerate(cases):
        ks = jax.random.split(jax.random.key(100 + i), 6)
        for dtype in (jnp.bfloat16, jnp.float32) if i == 0 else (jnp.bfloat16,):
            q = _normal(ks[0], (c["B"], c["T"], c["Hqk"], c["K"]), dtype) * 0.3
            k = _normal(ks[1], (c["B"], c["T"], c["Hqk"], c["K"]), dtype) * 0.3
            v = _normal(ks[2], (c["B"], c["T"], c["Hv"], c["V"]), dtype)
            if c["norm"]:
                q, k = jax.nn.elu(q) + 1, jax.nn.elu(k) + 1
            g_shape = {
                "scalar": (c["B"], c["T"], c["Hv"]),
                "channel": (c["B"], c["T"], c["Hv"], c["K"]),
            }.get(c["decay"])
            g = (
                None
                if g_shape is None
                else jax.nn.log_sigmoid(jax.random.normal(ks[3], g_shape) + 3.0)
            )
            s0 = jax.random.normal(ks[4], (c["B"], c["Hv"], c["K"], c["V"] + c["norm"])) * 0.1
            seg = (
                jnp.sort(jax.random.randint(ks[5], (c["B"], c["T"]), 0, 3), axis=1)
                if c["seg"]
                else None
            )
            kw = dict(segment_ids=seg, normalize=c["norm"], return_final_state=True)
            name = f"{dtype.__name__} " + " ".join(f"{k}={v}" for k, v in c.items())
            args = (q, k, v, s0) + (() if g is None else (g,))

            def make(impl, up=False):
                def f(q, k, v, s0, g=None):
                    if up:
                        q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
                    return K.linear_attention(
                        q, k, v, g, initial_state=s0, implementation=impl, **kw
                    )

                return f

            for impl in ("pallas_triton", "xla"):
                _compare(
                    "linear_attention",
                    impl,
                    name,
                    make(impl),
                    make("xla", up=True),
                    args,
                    tuple(range(len(args))),
                )
    _fla_check()


def _fla_check():
    """seqmix's Triton kernel against flash-linear-attention's forward on the same inputs."""
    try:
        import torch
        from fla.ops.gla import chunk_gla
        from fla.ops.simple_gla import chunk_simple_gla

        B, T, H, D = 2, 2048, 8, 128
        ks = jax.random.split(jax.random.key(7), 4)
        q = _normal(ks[0], (B, T, H, D), jnp.bfloat16)
        k = _normal(ks[1], (B, T, H, D), jnp.bfloat16) * 0.1
        v = _normal(ks[2], (B, T, H, D), jnp.bfloat16)
        tt = lambda x: torch.from_numpy(np.asarray(x.astype(jnp.float32))).cuda()
        for decay in ("scalar", "channel"):
            shape = (B, T, H) if decay == "scalar" else (B, T, H, D)
            g = jax.nn.log_sigmoid(jax.random.normal(ks[3], shape) + 3.0)
            o = K.linear_attention(q, k, v, g, implementation="pallas_triton")
            fn = chunk_simple_gla if decay == "scalar" else chunk_gla
            ot, _ = fn(tt(q).bfloat16(), tt(k).bfloat16(), tt(v).bfloat16(), tt(g), scale=D**-0.5)
            _record(
                "linear_attention",
                "pallas_triton vs fla",
                f"bf16 {B}x{T}x{H}x{D} {decay}",
                max_err=relative_error(o, ot.float().cpu().numpy()),
            )
    except Exception as e:  # noqa: BLE001
        _record("linear_attention", "pallas_triton vs fla", "", error=str(e)[:400])


def check_selective_scan():
    for i, (B, T, Dm, N, G) in enumerate(((2, 1000, 256, 16, 1), (1, 777, 512, 16, 2))):
        ks = jax.random.split(jax.random.key(200 + i), 9)
        for dtype in (jnp.bfloat16, jnp.float32) if i == 0 else (jnp.bfloat16,):
            u = _normal(ks[0], (B, T, Dm), dtype)
            delta = _normal(ks[1], (B, T, Dm), dtype)
            A = -jnp.exp(jax.random.normal(ks[2], (Dm, N)))
            Bm = _normal(ks[3], (B, T, G, N), dtype)
            C = _normal(ks[4], (B, T, G, N), dtype)
            D = jax.random.normal(ks[5], (Dm,))
            z = _normal(ks[6], (B, T, Dm), dtype)
            bias = jax.random.normal(ks[7], (Dm,)) * 0.1
            h0 = jax.random.normal(ks[8], (B, Dm, N))
            args = (u, delta, A, Bm, C, D, z, bias, h0)

            def make(impl, up=False):
                def f(u, delta, A, Bm, C, D, z, bias, h0):
                    if up:
                        u, delta, Bm, C, z = (x.astype(jnp.float32) for x in (u, delta, Bm, C, z))
                    return K.selective_scan(
                        u,
                        delta,
                        A,
                        Bm,
                        C,
                        D,
                        z,
                        delta_bias=bias,
                        delta_softplus=True,
                        initial_state=h0,
                        return_final_state=True,
                        implementation=impl,
                    )

                return f

            for impl in ("pallas_triton", "xla"):
                _compare(
                    "selective_scan",
                    impl,
                    f"{dtype.__name__} B={B} T={T} Dm={Dm} G={G}",
                    make(impl),
                    make("xla", up=True),
                    args,
                    tuple(range(9)),
                )


def check_conv1d():
    for W in (2, 4, 8):
        ks = jax.random.split(jax.random.key(300 + W), 4)
        for dtype in (jnp.bfloat16, jnp.float32) if W == 4 else (jnp.bfloat16,):
            x = _normal(ks[0], (4, 1001, 768), dtype)
            w = _normal(ks[1], (W, 768), dtype)
            b = _normal(ks[2], (768,), dtype)
            s0 = _normal(ks[3], (4, W - 1, 768), dtype)

            def make(impl, up=False):
                def f(x, w, b, s0):
                    if up:
                        x, w, b, s0 = (a.astype(jnp.float32) for a in (x, w, b, s0))
                    return K.causal_conv1d(
                        x,
                        w,
                        b,
                        activation="silu",
                        initial_state=s0,
                        return_final_state=True,
                        implementation=impl,
                    )

                return f

            for impl in ("pallas_triton", "xla"):
                _compare(
                    "causal_conv1d",
                    impl,
                    f"{dtype.__name__} W={W}",
                    make(impl),
                    make("xla", up=True),
                    (x, w, b, s0),
                    (0, 1, 2, 3),
                )


CHECKS = {
    "attention": check_attention,
    "decode_attention": check_decode,
    "linear_attention": check_linear_attention,
    "selective_scan": check_selective_scan,
    "causal_conv1d": check_conv1d,
}


def main(argv):
    del argv
    # the float32 reference must not use TF32 matmuls (XLA's default on GPU)
    jax.config.update("jax_default_matmul_precision", "highest")
    print("device:", jax.devices()[0].device_kind, "jax", jax.__version__, flush=True)
    for name, fn in CHECKS.items():
        if not _ONLY.value or name in _ONLY.value:
            fn()
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "gpu_check.json"), "w") as f:
            json.dump(ROWS, f, indent=1, default=str)
    print("\n| op | impl | case | max rel err | note |\n| --- | --- | --- | --- | --- |")
    for r in ROWS:
        err = r.get("max_err")
        note = r.get("error", "") or ("" if r.get("finite", True) else "NON-FINITE")
        print(
            f"| {r['op']} | {r['impl']} | {r['case'][:60]} | "
            f"{'' if err is None else f'{err:.2e}'} | {note[:120]} |"
        )


if __name__ == "__main__":
    app.run(main)
