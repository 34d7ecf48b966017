"""Softmax attention: every implementation side by side, one run.

    python -m seqmix.experiments.bench_kernels --op=attention [--quick]
    python -m seqmix.experiments.bench_kernels --op=attention --tune --tuning_out=tuning.json

``attention``: seqmix ``pallas_triton``, ``cudnn``, ``xla`` and jax's own Pallas Triton
``mha`` (``jax.experimental.pallas.ops.gpu.attention``; forward blocks 128 x 128, backward
64 x 64; it has no GQA, so GQA rows give it K/V repeated beforehand, and no window). bf16,
``[B, T, 16, D]`` with ``B * T = 32k`` tokens, D = 64 and 128, T = 1k..32k, causal and not,
GQA 4:1 rows and a 1k causal window at T = 32k (beside full causal at 32k). Forward and
forward+backward time and TFLOP/s: ``4 * B * H * D * pairs`` for the forward, where pairs is
``T * S``, halved when causal, and the exact number of visible (query, key) pairs for a
window; forward+backward counts 3.5x that. ``mem_mb``: XLA's account of the compiled
forward+backward; ``err_o`` / ``err_grad``: relative error of o / the worst of dq, dk, dv
against ``xla`` at the same shape.

``--tune`` runs the autotuner (``seqmix.kernels.tune``) over the Triton tiles of
``attention.tuning.SEARCH`` at ``[4, 8192, 16, D]`` causal, D = 64 and 128, and writes the
winners to the tuning file.

``SEQMIX_BENCH_FILTER=<substring>`` keeps only the shapes whose label contains it (a shorter
run, e.g. ``d64`` or ``d128``).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp

from seqmix.experiments.bench import common

TOKENS = 32768
HEADS = 16
DTYPE = jnp.bfloat16


def attention_shapes(quick: bool) -> list[dict]:
    shapes = []

    def add(D, T, causal, Hkv=HEADS, window=None):
        B = max(1, TOKENS // T)
        label = f"d{D} {B}x{T}x{HEADS}" + (f"/{Hkv}" if Hkv != HEADS else "")
        label += (" causal" if causal else "") + (f" w{window}" if window else "")
        shapes.append(
            dict(label=label, D=D, T=T, B=B, H=HEADS, Hkv=Hkv, causal=causal, window=window)
        )

    if quick:
        add(128, 4096, True)
        add(128, 4096, False)
        add(128, 16384, True, Hkv=HEADS // 4)
        add(128, 32768, True)
        add(128, 32768, True, window=1024)
        return common.filtered(shapes)
    for D in (64, 128):
        for T in (1024, 4096, 16384, 32768):
            for causal in (True, False):
                add(D, T, causal)
        add(D, 16384, True, Hkv=HEADS // 4)
        add(D, 32768, True, window=1024)
    return common.filtered(shapes)


def visible_pairs(T: int, S: int, causal: bool, window: int | None) -> float:
    """(query, key) pairs counted for FLOPs: T*S, half when causal, exact for a window."""
    if window is not None:  # causal window: query t sees keys [t - window, t]
        w = min(window, T - 1)
        return float(T * (w + 1) - w * (w + 1) // 2)
    return T * S / 2 if causal else float(T * S)


def seqmix_impl(impl):
    from seqmix.kernels import attention

    def f(q, k, v, *, causal, window):
        return attention(
            q, k, v, causal=causal, local_window_size=window and (window, 0), implementation=impl
        )

    return f


def jax_mha(default_blocks: bool):
    """jax's own Pallas Triton ``mha``: with its default blocks (32 x 32 backward
    tiles, as jax ships it) or with 64 x 64 backward tiles (faster on the H200)."""

    def f(q, k, v, *, causal, window):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            from jax.experimental.pallas.ops.gpu import attention as jax_attention
        if window is not None:
            raise NotImplementedError("jax mha has no local window")
        blocks = (
            jax_attention.BlockSizes.get_default()
            if default_blocks
            else jax_attention.BlockSizes(
                block_q=128,
                block_k=128,
                block_q_dkv=64,
                block_kv_dkv=64,
                block_q_dq=64,
                block_kv_dq=64,
            )
        )
        return jax_attention.mha(
            q, k, v, None, sm_scale=q.shape[-1] ** -0.5, causal=causal, block_sizes=blocks
        )

    return f


# The xla form takes seconds per call at long T: it is timed up to this length only.
XLA_MAX_T = 8192

ATTENTION_IMPLS = {
    "xla": seqmix_impl("xla"),  # first: the reference of every row's error (cudnn beyond XLA_MAX_T)
    "cudnn": seqmix_impl("cudnn"),
    "pallas_triton": seqmix_impl("pallas_triton"),
    "jax_mha": jax_mha(default_blocks=True),
    "jax_mha_bwd64": jax_mha(default_blocks=False),
}


def attention_inputs(s: dict):
    kq, kk, kv, kd = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(kq, (s["B"], s["T"], s["H"], s["D"]), DTYPE)
    k = jax.random.normal(kk, (s["B"], s["T"], s["Hkv"], s["D"]), DTYPE)
    v = jax.random.normal(kv, (s["B"], s["T"], s["Hkv"], s["D"]), DTYPE)
    do = jax.random.normal(kd, q.shape, DTYPE)
    return q, k, v, do


def run(quick: bool, ceilings: dict) -> tuple[list[dict], list[str]]:
    """Rows and the columns to print."""
    rows = common.new_rows()
    peak = ceilings.get("bf16_matmul_tflops")
    for s in attention_shapes(quick):
        q, k, v, do = attention_inputs(s)
        flops = (
            4.0 * s["B"] * s["H"] * s["D"] * visible_pairs(s["T"], s["T"], s["causal"], s["window"])
        )
        ref = None
        for name, impl in ATTENTION_IMPLS.items():
            row = {
                "impl": name,
                **{key: s[key] for key in ("label", "D", "T", "B", "H", "Hkv", "causal", "window")},
            }
            if name == "xla" and s["T"] > XLA_MAX_T:
                row["error"] = f"not timed above T={XLA_MAX_T} (seconds per call)"
                rows.append(row)
                continue
            kk, vv = k, v
            if name.startswith("jax_mha") and s["Hkv"] != s["H"]:
                kk = jnp.repeat(k, s["H"] // s["Hkv"], axis=2)  # the peer has no GQA
                vv = jnp.repeat(v, s["H"] // s["Hkv"], axis=2)
            f = lambda q, k, v, impl=impl: impl(q, k, v, causal=s["causal"], window=s["window"])
            fwd = jax.jit(f)
            fb = jax.jit(lambda q, k, v, do, f=f: jax.vjp(f, q, k, v)[1](do))
            out = common.attempt(row, "fwd", lambda: fwd(q, kk, vv))
            if out is not None:
                t = common.attempt(row, "fwd", lambda: common.time_jax(fwd, q, kk, vv))
                if t is not None:
                    row.update(fwd_ms=t * 1e3, fwd_tflops=flops / t / 1e12)
                    if peak:
                        row["fwd_of_peak"] = row["fwd_tflops"] / peak
            grads = common.attempt(row, "fwd+bwd", lambda: fb(q, kk, vv, do))
            if grads is not None:
                t = common.attempt(row, "fwd+bwd", lambda: common.time_jax(fb, q, kk, vv, do))
                if t is not None:
                    row.update(fb_ms=t * 1e3, fb_tflops=3.5 * flops / t / 1e12)
                mem = common.compiled_bytes(fb, q, kk, vv, do)
                row["mem_mb"] = None if mem is None else mem / 2**20
            if ref is None:
                if out is not None and grads is not None:
                    ref = (out, grads)
                    row["reference"] = True
            elif ref is not None:
                if out is not None and ref[0] is not None:
                    row["err_o"] = common.rel_err(out, ref[0])
                if grads is not None and ref[1] is not None:
                    if (
                        name.startswith("jax_mha") and s["Hkv"] != s["H"]
                    ):  # fold repeated heads back
                        G = s["H"] // s["Hkv"]
                        fold = lambda g: g.reshape(*g.shape[:2], s["Hkv"], G, -1).sum(3)
                        grads = (grads[0], fold(grads[1]), fold(grads[2]))
                    row["err_grad"] = max(common.rel_err(a, b) for a, b in zip(grads, ref[1]))
            print({key: row.get(key) for key in ATTENTION_COLUMNS}, flush=True)
            rows.append(row)
            del out, grads
    _plots(rows)
    return rows, ATTENTION_COLUMNS


ATTENTION_COLUMNS = [
    "label",
    "impl",
    "fwd_ms",
    "fwd_tflops",
    "fb_ms",
    "fb_tflops",
    "mem_mb",
    "err_o",
    "err_grad",
    "error",
]


def _plots(rows: list[dict]) -> None:
    """fwd time vs T per implementation (D = 128, H = 16 heads of K/V, no window)."""
    dirs = [d for d in (os.environ.get("OUT"), common.RESULTS_DIR) if d and os.path.isdir(d)]
    for causal in (True, False):
        sel = [
            r
            for r in rows
            if r["D"] == 128
            and r["Hkv"] == r["H"]
            and r["window"] is None
            and r["causal"] == causal
            and r.get("fwd_ms")
        ]
        if len({r["T"] for r in sel}) < 2:
            continue
        name = f"attention_fwd_d128_{'causal' if causal else 'full'}.png"
        for d in dirs:
            try:
                common.plot_time_vs_length(
                    sel,
                    os.path.join(d, name),
                    x="T",
                    y="fwd_ms",
                    group="impl",
                    title=f"attention forward, bf16, D=128, {TOKENS} tokens, "
                    f"{'causal' if causal else 'full'}",
                )
            except Exception as e:  # noqa: BLE001 - a plot must not lose the results
                print(f"plot {name} failed: {common.short_error(e)}")


def tune(quick: bool, out: str | None) -> list:
    """Autotunes the Triton tiles at ``[4, 8192, 16, D]`` causal for D = 64 and 128 (D = 128
    only when quick); returns the ``tune.Result`` of each."""
    from seqmix.kernels import attention

    results = []
    for D in (128,) if quick else (64, 128):
        s = dict(label=f"d{D} 4x8192x16 causal", D=D, T=8192, B=4, H=HEADS, Hkv=HEADS)
        if not common.filtered([s]):
            continue
        q, k, v, _ = attention_inputs(s)
        results.append(
            common.autotune(
                attention,
                (q, k, v),
                implementation="pallas_triton",
                kwargs=dict(causal=True),
                out=out,
                shape=s["label"],
            )
        )
    return results
