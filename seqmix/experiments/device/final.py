"""The kernels' headline shapes on a GPU machine in one short run, most important first.

    python -m seqmix.experiments.device.final [--deadline_s=500] [--sections=targets|variants]

Reuses the benchmark modules' measuring functions on the headline shapes only (a shorter
run than the full sweeps of bench_kernels), writes every row to $OUT/final.json as it goes,
and skips the sections that the deadline leaves no time for.
"""

from __future__ import annotations

import json
import os
import time
import traceback

from absl import app, flags

_DEADLINE = flags.DEFINE_float("deadline_s", 500.0, "Stop starting sections after this.")
_SECTIONS = flags.DEFINE_string(
    "sections",
    "targets",
    "'targets' (the headline shapes) or 'variants' (the tuning "
    "variants of the benchmarks beside the defaults).",
)

ROWS: list[dict] = []
START = time.time()


def _save():
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "final.json"), "w") as f:
            json.dump(ROWS, f, indent=1, default=str)


def _section(name, fn):
    if time.time() - START > _DEADLINE.value:
        ROWS.append({"section": name, "error": "skipped: past --deadline_s"})
        print(f"skip {name}", flush=True)
        return
    t0 = time.time()
    try:
        for row in fn():
            row["section"] = name
            ROWS.append(row)
            print(json.dumps(row, default=str), flush=True)
            _save()
    except Exception as e:  # noqa: BLE001 - one section failing must not stop the others
        ROWS.append({"section": name, "error": f"{type(e).__name__}: {str(e)[:400]}"})
        traceback.print_exc()
    print(f"section {name}: {time.time() - t0:.0f}s", flush=True)
    _save()


def scan(B, T, ceilings, *, with_xla=True, variants=False):
    """xla (the reference of the error columns when timed) and pallas_triton; with
    ``variants`` also the tile variants of the bench."""
    from seqmix.experiments.bench import common
    from seqmix.experiments.bench import selective_scan as S

    def impls_for(s):
        impls = {"xla": S.scan_fn("xla")} if with_xla else {}
        impls["pallas_triton"] = S.scan_fn("pallas_triton")
        if variants:
            impls.update({k: S.scan_fn("pallas_triton", c) for k, c in S.variants(T).items()})
        return impls

    shape = dict(label=f"{B}x{T}x1536x16", B=B, T=T, **S.SCAN)
    return lambda: (
        dict(row, op="selective_scan")
        for row in common.iter_shapes(
            [shape],
            lambda s: S.inputs(B, T, s["Dm"], s["N"]),
            impls_for,
            S.COLUMNS,
            ceilings["copy_tbps"],
        )
    )


def conv(ceilings):
    from seqmix.experiments.bench import causal_conv1d as C
    from seqmix.experiments.bench import common

    shape = dict(label="8x4096x3072 w4", B=8, T=4096, **C.CONV)
    return lambda: (
        dict(row, op="causal_conv1d")
        for row in common.iter_shapes(
            [shape],
            lambda s: C.inputs(8, 4096, s["C"], s["W"]),
            lambda s: {"xla": C.conv_fn("xla"), "pallas_triton": C.conv_fn("pallas_triton")},
            C.COLUMNS,
            ceilings["copy_tbps"],
        )
    )


def linear(B, T, H, D, decay, ceilings, backward, with_xla):
    from seqmix.experiments.bench import linear_attention as L

    def run():
        for row in L._measure_shape(
            "shapes", B, T, H, D, decay, ceilings, backward=backward, with_xla=with_xla
        ):
            row["op"] = "linear_attention"
            yield row

    return run


def _attention_rows(label, s, impls):
    """fwd and fwd+bwd rows of ``impls`` (name -> f(q, k, v, *, causal, window)) at shape s."""
    import jax

    from seqmix.experiments.bench import attention as A
    from seqmix.experiments.bench import common

    q, k, v, do = A.attention_inputs(s)
    flops = (
        4.0 * s["B"] * s["H"] * s["D"] * A.visible_pairs(s["T"], s["T"], s["causal"], s["window"])
    )
    for impl, f0 in impls.items():
        f = lambda q, k, v, f0=f0: f0(q, k, v, causal=s["causal"], window=s["window"])
        fwd = jax.jit(f)
        fb = jax.jit(lambda q, k, v, do, f=f: jax.vjp(f, q, k, v)[1](do))
        row = {"op": "attention", "impl": impl, "label": label}
        try:
            t = common.time_jax(fwd, q, k, v)
            row.update(fwd_ms=t * 1e3, fwd_tflops=flops / t / 1e12)
            t = common.time_jax(fb, q, k, v, do)
            row.update(fb_ms=t * 1e3, fb_tflops=3.5 * flops / t / 1e12)
        except Exception as e:  # noqa: BLE001
            row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
        yield row


def window(ceilings):
    """A 1k window against full causal attention at T = 32k (target: >= 5x faster)."""
    from seqmix.experiments.bench import attention as A

    def run():
        impls = {name: A.seqmix_impl(name) for name in ("pallas_triton", "cudnn")}
        for label, win in (("full causal", None), ("window 1024", 1024)):
            s = dict(D=128, T=32768, B=1, H=16, Hkv=16, causal=True, window=win)
            yield from _attention_rows(f"d128 1x32768 {label}", s, impls)

    return run


def attention_d64(ceilings):
    from seqmix.experiments.bench import attention as A

    def run():
        impls = {
            "pallas_triton": A.seqmix_impl("pallas_triton"),
            "cudnn": A.seqmix_impl("cudnn"),
            "jax_mha": A.jax_mha(True),
            "jax_mha_bwd64": A.jax_mha(False),
        }
        for causal in (True, False):
            s = dict(D=64, T=16384, B=2, H=16, Hkv=16, causal=causal, window=None)
            yield from _attention_rows(f"d64 2x16384x16{' causal' if causal else ''}", s, impls)

    return run


def targets(ceilings):
    _section("scan 8x4096", scan(8, 4096, ceilings))
    _section("conv", conv(ceilings))
    _section("linear 8x4096 scalar", linear(8, 4096, 16, 128, "scalar", ceilings, True, True))
    _section("attention window", window(ceilings))
    _section("linear 2x16384 scalar", linear(2, 16384, 16, 128, "scalar", ceilings, True, False))
    _section("linear 1x65536 scalar", linear(1, 65536, 16, 128, "scalar", ceilings, False, False))
    _section("linear 8x4096 channel", linear(8, 4096, 16, 128, "channel", ceilings, True, False))
    _section("linear 8x4096x64 scalar", linear(8, 4096, 16, 64, "scalar", ceilings, False, False))
    _section("scan 2x16384", scan(2, 16384, ceilings))
    _section("attention d64", attention_d64(ceilings))


def variants(ceilings):
    """The tuning variants of the benchmarks beside the defaults: linear attention's
    (``bench.linear_attention.DEFAULT_CONFIGS``, beside flash-linear-attention) and the
    selective scan's tile choices."""
    _section("linear 8x4096 scalar", linear(8, 4096, 16, 128, "scalar", ceilings, True, False))
    _section("linear 2x16384 scalar", linear(2, 16384, 16, 128, "scalar", ceilings, True, False))
    _section("linear 1x65536 scalar", linear(1, 65536, 16, 128, "scalar", ceilings, False, False))
    _section("scan 8x4096", scan(8, 4096, ceilings, with_xla=False, variants=True))
    _section("scan 2x16384", scan(2, 16384, ceilings, variants=True))
    _section("attention d64", attention_d64(ceilings))


SECTIONS = {"targets": targets, "variants": variants}


def main(argv):
    del argv
    if _SECTIONS.value not in SECTIONS:
        raise ValueError(f"--sections must be one of {sorted(SECTIONS)}, got {_SECTIONS.value!r}")
    from seqmix.experiments.bench import common

    ceilings = {"bf16_matmul_tflops": common.matmul_ceiling(), "copy_tbps": common.copy_ceiling()}
    ROWS.append({"section": "ceilings", **ceilings, **common.environment()})
    print(ceilings, flush=True)
    SECTIONS[_SECTIONS.value](ceilings)
    print(f"total {time.time() - START:.0f}s")
    keys = [
        "section",
        "impl",
        "label",
        "blocks",
        "fwd_ms",
        "fwdbwd_ms",
        "fb_ms",
        "fwd_tflops",
        "fb_tflops",
        "fwd_x_rowo",
        "fb_x_rowo",
        "fb_vs_xla",
        "copy_frac",
        "ns_per_token",
        "fwdbwd_speedup_vs_xla",
        "rel_err_xla",
        "rel_err_fla",
        "err_y",
        "err_grad",
        "error",
    ]
    print(common.markdown_table([r for r in ROWS if r.get("section") != "ceilings"], keys))


if __name__ == "__main__":
    app.run(main)
