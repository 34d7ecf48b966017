"""Mamba-1's selective scan and the short causal convolution: implementations side by side.

    python -m seqmix.experiments.bench_kernels --op=selective_scan [--quick]
    python -m seqmix.experiments.bench_kernels --op=causal_conv1d [--quick]

``selective_scan``: seqmix ``pallas_triton`` against seqmix ``xla``
(``lax.associative_scan``), ``[B, T, Dm, N]`` with ``B * T = 32k`` tokens, Dm = 1536, N = 16,
T = 1k..16k (the headline shapes are [8, 4096, 1536, 16] and [2, 16384, 1536, 16]); bf16 u,
delta, z, B, C (one group), float32 A, D, delta_bias; delta_softplus, D and z given. At
T = 4k and 16k, ``pallas_triton[...]`` rows time other tile and time-segment choices and
the blocked kernels (``[blocked ...]``, the default before 2026-11-28; see ``scan_variants``).
``causal_conv1d``: ``[B, T, 3072]`` width 4, bf16, bias and SiLU, ``B * T = 32k``,
T = 1k, 4k, 16k (two other tile choices at 4k). No peer: the mamba_ssm and causal_conv1d
CUDA packages have no wheels on the device.

Each row: forward and forward+backward time; ``*_gbs``, the bytes of reading every input
(and, for forward+backward, the output cotangent) once and writing every output (y and
every gradient) once, per second; ``*_x_rowo``, the time over that read-once-write-once
time at the copy bandwidth measured in the same run (the issue's targets: scan
forward+backward <= 3, convolution <= 1.5); ``fb_vs_xla``, xla's forward+backward time over
this one's (target >= 5); ``err_y`` / ``err_grad``: relative error of y / the worst
gradient against ``xla`` at the same shape. Plots of time against T go next to the JSON.

``tune_blocks`` (below, not run by bench_kernels) times more tile choices at one shape.
``SEQMIX_BENCH_FILTER=<substring>`` keeps only the shapes whose label contains it.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp

from seqmix.experiments.bench import common

TOKENS = 32768
DTYPE = jnp.bfloat16
SCAN = dict(Dm=1536, N=16)
CONV = dict(C=3072, W=4)


def run(op: str, quick: bool, ceilings: dict) -> tuple[list[dict], list[str]]:
    """Rows and the columns to print, for ``op`` in {"selective_scan", "causal_conv1d"}."""
    if op == "selective_scan":
        return run_scan(quick, ceilings)
    if op == "causal_conv1d":
        return run_conv(quick, ceilings)
    raise ValueError(f"op must be 'selective_scan' or 'causal_conv1d', got {op!r}")


def _nbytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _measure(row: dict, fwd, fb, args, ct, copy_tbps: float | None):
    """Times ``fwd(*args)`` and ``fb(*args, ct)`` into ``row``; returns their outputs."""
    out = common.attempt(row, "fwd", lambda: jax.block_until_ready(fwd(*args)))
    if out is not None:
        t = common.attempt(row, "fwd", lambda: common.time_jax(fwd, *args))
        if t is not None:
            rowo = _nbytes(args) + _nbytes(out)
            row.update(fwd_ms=t * 1e3, fwd_gbs=rowo / t / 1e9)
            if copy_tbps:
                row["fwd_x_rowo"] = t / (rowo / (copy_tbps * 1e12))
    got = common.attempt(row, "fwd+bwd", lambda: jax.block_until_ready(fb(*args, ct)))
    if got is not None:
        t = common.attempt(row, "fwd+bwd", lambda: common.time_jax(fb, *args, ct))
        if t is not None:
            rowo = _nbytes(args) + _nbytes(ct) + _nbytes(got)  # got = (y, grads)
            row.update(fb_ms=t * 1e3, fb_gbs=rowo / t / 1e9)
            if copy_tbps:
                row["fb_x_rowo"] = t / (rowo / (copy_tbps * 1e12))
        mem = common.compiled_bytes(fb, *args, ct)
        row["mem_mb"] = None if mem is None else mem / 2**20
    return out, got


def _compare(row: dict, out, got, ref_out, ref_got, ref_row: dict | None):
    if out is not None and ref_out is not None:
        row["err_y"] = common.rel_err(out, ref_out)
    if got is not None and ref_got is not None:
        row["err_grad"] = max(
            common.rel_err(a, b)
            for a, b in zip(jax.tree.leaves(got[1]), jax.tree.leaves(ref_got[1]))
        )
    if ref_row is not None and row.get("fb_ms") and ref_row.get("fb_ms"):
        row["fb_vs_xla"] = ref_row["fb_ms"] / row["fb_ms"]


def _fwd_and_fb(f):
    fwd = jax.jit(f)

    def fb(*args):
        *args, ct = args
        y, vjp = jax.vjp(f, *args)
        return y, vjp(ct)

    return fwd, jax.jit(fb)


def _plots(rows: list[dict], op: str, title: str) -> None:
    dirs = [d for d in (os.environ.get("OUT"), common.RESULTS_DIR) if d and os.path.isdir(d)]
    for key, what in (("fwd_ms", "forward"), ("fb_ms", "forward+backward")):
        sel = [r for r in rows if r.get(key) and "[" not in r["impl"]]
        if len({r["T"] for r in sel}) < 2:
            continue
        name = f"{op}_{key[:-3]}.png"
        for d in dirs:
            try:
                common.plot_time_vs_length(
                    sel,
                    os.path.join(d, name),
                    x="T",
                    y=key,
                    group="impl",
                    title=f"{op} {what}, {title}",
                )
            except Exception as e:  # noqa: BLE001 - a plot must not lose the results
                print(f"plot {name} failed: {common.short_error(e)}")


# --- selective scan ------------------------------------------------------------------------


def scan_shapes(quick: bool) -> list[dict]:
    lengths = (2048,) if quick else (1024, 2048, 4096, 8192, 16384)
    tokens = 4096 if quick else TOKENS
    return common.filtered(
        [
            dict(label=f"{tokens // T}x{T}x{SCAN['Dm']}x{SCAN['N']}", B=tokens // T, T=T, **SCAN)
            for T in lengths
        ]
    )


def scan_inputs(B: int, T: int, Dm: int, N: int, G: int = 1):
    ks = jax.random.split(jax.random.key(0), 9)
    u = jax.random.normal(ks[0], (B, T, Dm), DTYPE)
    delta = (0.5 * jax.random.normal(ks[1], (B, T, Dm), jnp.float32) - 1.0).astype(DTYPE)
    A = -jnp.exp(jax.random.uniform(ks[2], (Dm, N), jnp.float32, 0.0, 2.5))
    Bm = jax.random.normal(ks[3], (B, T, G, N), DTYPE)
    Cm = jax.random.normal(ks[4], (B, T, G, N), DTYPE)
    D = jax.random.normal(ks[5], (Dm,), jnp.float32)
    z = jax.random.normal(ks[6], (B, T, Dm), DTYPE)
    bias = 0.5 * jax.random.normal(ks[7], (Dm,), jnp.float32)
    dy = jax.random.normal(ks[8], (B, T, Dm), DTYPE)
    return (u, delta, A, Bm, Cm, D, z, bias), dy


def _scan_fn(impl: str, blocks=None):
    def f(u, delta, A, B, C, D, z, bias):
        if blocks is not None:
            from seqmix.kernels.selective_scan import triton

            return triton.selective_scan(
                u,
                delta,
                A,
                B,
                C,
                D,
                z,
                delta_bias=bias,
                delta_softplus=True,
                initial_state=None,
                blocks=blocks,
            )[0]
        from seqmix.kernels import selective_scan

        return selective_scan(
            u, delta, A, B, C, D, z, delta_bias=bias, delta_softplus=True, implementation=impl
        )

    return f


def scan_variants(T: int) -> dict:
    """Other tile choices of the Triton kernels, timed at T = 4k and 16k (at 16k, B = 2).
    The default is the one-channel-per-lane preset (``LANES_BLOCKS``, ``triton_lanes.py``);
    ``[lanes ...]`` rows vary it (8 or 2 time segments, chunks of 16, 16 channels a warp,
    64 channels over 2 warps), the others time the "blocked" kernels (the default before the
    H200 run of 2026-11-28) and their tile choices."""
    import dataclasses

    from seqmix.kernels.selective_scan.triton import BLOCKED_BLOCKS, LANES_BLOCKS, Blocks

    lanes = functools.partial(dataclasses.replace, LANES_BLOCKS)
    if T >= 16384:
        variants = {"pallas_triton[lanes seg8]": lanes(segments=8)}
    else:
        # seg8 first: at [8, 4096] the default runs 384 one-warp programs (~3 warps an
        # SM, latency-bound); 8 time segments give 3072 for ~2x the forward's work
        variants = {
            "pallas_triton[lanes seg8]": lanes(segments=8),
            "pallas_triton[lanes c16]": lanes(chunk=16),
            "pallas_triton[lanes seg2]": lanes(segments=2),
            "pallas_triton[lanes d16]": lanes(block_d=16),
            "pallas_triton[lanes d64 w2]": lanes(
                block_d=64, num_warps=2, bwd_num_warps=2, segments=1
            ),
        }
    variants["pallas_triton[blocked]"] = BLOCKED_BLOCKS
    variants.update(
        {
            "pallas_triton[blocked d16]": Blocks(block_d=16),
            "pallas_triton[blocked d64 w8]": Blocks(block_d=64, num_warps=8, bwd_num_warps=8),
            "pallas_triton[blocked d16 w1 t4]": Blocks(
                block_d=16, num_warps=1, bwd_num_warps=1, bwd_tile=4
            ),
            "pallas_triton[blocked c32]": Blocks(chunk=32),
        }
    )
    if T >= 16384:
        variants["pallas_triton[blocked seg1]"] = Blocks(segments=1)
        variants["pallas_triton[blocked seg8]"] = Blocks(segments=8)
    return variants


def iter_shapes(shapes, inputs, impls_for, columns, copy):
    """Times ``impls_for(shape)`` (name -> f) at every shape, yielding each row as it is
    measured; output and gradient errors against the first implementation (``xla`` when
    timed)."""
    for s in shapes:
        args, dy = inputs(s)
        ref = None
        for name, f in impls_for(s).items():
            row = {"impl": name, **s}
            fwd, fb = _fwd_and_fb(f)
            out, got = _measure(row, fwd, fb, args, dy, copy)
            if ref is None:
                ref = (out, got, row)
            else:
                _compare(row, out, got, *ref)
            print({k: row.get(k) for k in columns}, flush=True)
            yield row
            del out, got
        del ref, args, dy


def run_scan(quick: bool, ceilings: dict) -> tuple[list[dict], list[str]]:
    def impls_for(s):
        impls = {"xla": _scan_fn("xla"), "pallas_triton": _scan_fn("pallas_triton")}
        if not quick and s["T"] in (4096, 16384):
            impls.update(
                {k: _scan_fn("pallas_triton", b) for k, b in scan_variants(s["T"]).items()}
            )
        return impls

    rows = common.new_rows()
    rows.extend(
        iter_shapes(
            scan_shapes(quick),  # row by row: a time limit keeps them
            lambda s: scan_inputs(s["B"], s["T"], s["Dm"], s["N"]),
            impls_for,
            SCAN_COLUMNS,
            ceilings.get("copy_tbps"),
        )
    )
    _plots(rows, "selective_scan", f"bf16, Dm={SCAN['Dm']}, N={SCAN['N']}, {TOKENS} tokens")
    return rows, SCAN_COLUMNS


SCAN_COLUMNS = [
    "label",
    "impl",
    "fwd_ms",
    "fwd_gbs",
    "fwd_x_rowo",
    "fb_ms",
    "fb_gbs",
    "fb_x_rowo",
    "fb_vs_xla",
    "mem_mb",
    "err_y",
    "err_grad",
    "error",
]


# --- causal conv1d -------------------------------------------------------------------------


def conv_shapes(quick: bool) -> list[dict]:
    lengths = (2048,) if quick else (1024, 4096, 16384)
    tokens = 4096 if quick else TOKENS
    return common.filtered(
        [
            dict(label=f"{tokens // T}x{T}x{CONV['C']} w{CONV['W']}", B=tokens // T, T=T, **CONV)
            for T in lengths
        ]
    )


def conv_inputs(B: int, T: int, C: int, W: int):
    ks = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(ks[0], (B, T, C), DTYPE)
    w = 0.5 * jax.random.normal(ks[1], (W, C), jnp.float32)
    b = jax.random.normal(ks[2], (C,), jnp.float32)
    dy = jax.random.normal(ks[3], (B, T, C), DTYPE)
    return (x, w, b), dy


def _conv_fn(impl: str, blocks=None):
    def f(x, w, b):
        if blocks is not None:
            from seqmix.kernels.conv1d import triton

            return triton.causal_conv1d(x, w, b, activation="silu", blocks=blocks)[0]
        from seqmix.kernels import causal_conv1d

        return causal_conv1d(x, w, b, activation="silu", implementation=impl)

    return f


def conv_variants():
    from seqmix.kernels.conv1d.triton import Blocks

    return {
        "pallas_triton[c128 s128]": Blocks(block_c=128, seg=128, num_warps=2),
        "pallas_triton[c512 s512 w8]": Blocks(block_c=512, seg=512, num_warps=8),
    }


def run_conv(quick: bool, ceilings: dict) -> tuple[list[dict], list[str]]:
    def impls_for(s):
        impls = {"xla": _conv_fn("xla"), "pallas_triton": _conv_fn("pallas_triton")}
        if not quick and s["T"] == 4096:
            impls.update({k: _conv_fn("pallas_triton", b) for k, b in conv_variants().items()})
        return impls

    rows = common.new_rows()
    rows.extend(
        iter_shapes(
            conv_shapes(quick),  # row by row: a time limit keeps them
            lambda s: conv_inputs(s["B"], s["T"], s["C"], s["W"]),
            impls_for,
            CONV_COLUMNS,
            ceilings.get("copy_tbps"),
        )
    )
    _plots(rows, "causal_conv1d", f"bf16, C={CONV['C']}, width {CONV['W']}, {TOKENS} tokens")
    return rows, CONV_COLUMNS


CONV_COLUMNS = SCAN_COLUMNS


# --- more tile choices (not part of bench_kernels) -----------------------------------------


def tune_blocks(op: str = "selective_scan", B: int = 8, T: int = 4096, candidates=None):
    """Times the Triton kernels of ``op`` over tile choices at one shape (forward+backward)
    and prints them fastest first; returns ``[(ms, blocks), ...]``.

        python -c "from seqmix.experiments.bench.selective_scan import tune_blocks; tune_blocks()"
    """
    if op == "selective_scan":
        from seqmix.kernels.selective_scan.triton import Blocks

        args, dy = scan_inputs(B, T, SCAN["Dm"], SCAN["N"])
        fn = _scan_fn
        candidates = candidates or [
            Blocks(block_d=d, chunk=c, bwd_tile=t, num_warps=w, bwd_num_warps=w)
            for d, w in ((16, 1), (16, 2), (32, 1), (32, 2), (32, 4), (64, 4), (64, 8))
            for c, t in ((16, 8), (32, 8), (16, 4))
            if not (w == 1 and t == 8 and d >= 32)
        ]
    else:
        from seqmix.kernels.conv1d.triton import Blocks

        args, dy = conv_inputs(B, T, CONV["C"], CONV["W"])
        fn = _conv_fn
        candidates = candidates or [
            Blocks(block_c=c, seg=sg, unroll=u, num_warps=w)
            for c, w in ((128, 1), (128, 2), (256, 2), (256, 4), (512, 4), (512, 8))
            for sg, u in ((128, 8), (256, 8), (512, 16))
        ]
    results = []
    for blocks in candidates:
        _, fb = _fwd_and_fb(fn("pallas_triton", blocks))
        try:
            t = common.time_jax(fb, *args, dy)
        except Exception as e:  # noqa: BLE001 - a tile that does not compile is skipped
            print(f"{blocks}: {common.short_error(e)}", flush=True)
            continue
        results.append((t * 1e3, blocks))
        print(f"{blocks}: {t * 1e3:.3f} ms", flush=True)
    results.sort(key=lambda r: r[0])
    for ms, blocks in results[:5]:
        print(f"best: {ms:.3f} ms {blocks}")
    return results
