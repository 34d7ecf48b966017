"""Timing, ceilings and result files shared by the kernel benchmarks.

Protocol (docs/benchmarking.md): compile first, warm up, enqueue ``n`` calls back to back and block
once, median of several repetitions; report beside the bf16 matmul and copy ceilings
measured in the same run. Memory is XLA's own account of the compiled call (arguments,
outputs and temporaries), which is exact and needs no allocator reset.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import sys
import traceback
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from seqmix.kernels import tune

RESULTS_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "results")


# Median seconds per call of a jitted fn(*args): n calls enqueued, one block (the autotuner's).
time_jax = tune.time_call


def time_torch(fn: Callable, reps: int = 5) -> float:
    """Median seconds per call of a PyTorch callable, timed with CUDA events (do_bench)."""
    import triton.testing  # only on the GPU machine

    fn()
    ms = triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")
    return ms * 1e-3


def compiled_bytes(fn: Callable, *args) -> int | None:
    """Device memory of one call as XLA accounts it: arguments + outputs + temporaries."""
    try:
        ma = jax.jit(fn).lower(*args).compile().memory_analysis()
        return int(
            ma.argument_size_in_bytes
            + ma.output_size_in_bytes
            + ma.temp_size_in_bytes
            - ma.alias_size_in_bytes
        )
    except Exception:  # noqa: BLE001 - memory analysis is optional per backend
        return None


def matmul_ceiling(n: int = 8192) -> float:
    """bf16 matmul TFLOP/s through XLA on random data."""
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (n, n), jnp.bfloat16)
    b = jax.random.normal(kb, (n, n), jnp.bfloat16)
    f = jax.jit(lambda a, b: a @ b)
    return 2 * n**3 / time_jax(f, a, b) / 1e12


def copy_ceiling(nbytes: int = 1 << 31) -> float:
    """Device copy bandwidth in TB/s (bytes read + written), the best of XLA and PyTorch."""
    x = jax.random.normal(jax.random.key(0), (nbytes // 4,), jnp.float32)
    f = jax.jit(lambda x: x * 2.0)
    best = 2 * nbytes / time_jax(f, x) / 1e12
    try:
        import torch

        if torch.cuda.is_available():
            src = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda").normal_()
            dst = torch.empty_like(src)
            best = max(best, 2 * nbytes / time_torch(lambda: dst.copy_(src)) / 1e12)
    except ImportError:
        pass
    return best


def environment() -> dict[str, Any]:
    env = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": str(jax.devices()[0].device_kind),
        "backend": jax.default_backend(),
        "jax": jax.__version__,
        "python": platform.python_version(),
    }
    with contextlib.suppress(ImportError):
        import jaxlib

        env["jaxlib"] = jaxlib.__version__
    # the peers' versions from their installed metadata: importing torch to read it takes
    # tens of seconds on a cold machine, enough to run a short stage out of its time limit
    import importlib.metadata

    for mod, dist in (("torch", "torch"), ("triton", "triton"), ("fla", "flash-linear-attention")):
        loaded = sys.modules.get(mod)
        if loaded is not None and hasattr(loaded, "__version__"):
            env[mod] = loaded.__version__
            continue
        with contextlib.suppress(Exception):  # an absent or broken peer only loses its line
            env[mod] = importlib.metadata.version(dist)
    return env


_LIVE: list[list[dict]] = []


def new_rows() -> list[dict]:
    """An empty list for a benchmark's result rows, registered so that ``live_rows`` can
    recover them when a time limit interrupts the run before it returns them."""
    rows: list[dict] = []
    _LIVE.append(rows)
    return rows


def live_rows() -> list[dict]:
    """Every row appended so far to the lists of ``new_rows``, in order of creation."""
    return [r for rows in _LIVE for r in rows]


def run_op(module, op: str, quick: bool, ceilings: dict, out_dir: str | None):
    """``(rows, columns, json path)`` of ``module.run(quick=..., ceilings=...)``, written as
    JSON. When a time limit interrupts it (SIGINT), the rows measured so far (``live_rows``)
    are written, with ``interrupted`` among the ceilings."""
    try:
        rows, columns = module.run(quick=quick, ceilings=ceilings)
    except KeyboardInterrupt:
        rows, columns = live_rows(), ["label", "impl", "error"]
        for r in rows:
            columns += [k for k in r if k not in columns and k != "error_full"]
        print(f"interrupted after {len(rows)} rows", flush=True)
        ceilings = dict(ceilings, interrupted=True)
    return rows, columns, write_results(op, rows, ceilings, out_dir)


def write_results(op: str, rows: list[dict], ceilings: dict, out_dir: str | None = None) -> str:
    """Writes ``{env, ceilings, rows}`` as JSON (benchmarks/results and $OUT when set)."""
    payload = {"op": op, "env": environment(), "ceilings": ceilings, "rows": rows}
    stamp = payload["env"]["date"][:10]
    paths = []
    for d in filter(None, [out_dir or RESULTS_DIR, os.environ.get("OUT")]):
        os.makedirs(d, exist_ok=True)
        path = os.path.join(d, f"{op}_{stamp}.json")
        with open(path, "w") as f:
            json.dump(payload, f, indent=1, default=float)
        paths.append(path)
    return paths[0]


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}"
        return "–" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def plot_time_vs_length(
    rows: list[dict],
    path: str,
    *,
    x: str = "T",
    y: str = "ms",
    group: str = "impl",
    title: str = "",
) -> None:
    """Log-log plot of time against sequence length, one line per implementation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in sorted({r[group] for r in rows if r.get(y) is not None}):
        pts = sorted((r[x], r[y]) for r in rows if r[group] == name and r.get(y) is not None)
        ax.plot(*zip(*pts), marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def rel_err(x, ref) -> float:
    x = np.asarray(jnp.asarray(x, jnp.float32), np.float64)
    ref = np.asarray(jnp.asarray(ref, jnp.float32), np.float64)
    return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30))


def short_error(e: BaseException) -> str:
    line = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return f"{type(e).__name__}: {line}"[:90]


def attempt(row: dict, key: str, fn):
    """Runs ``fn()``; on failure records the error in ``row`` and returns None, so that one
    implementation failing never stops a benchmark run."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001
        row.setdefault("error", f"{key}: {short_error(e)}")
        row.setdefault("error_full", traceback.format_exc(limit=6))
        return None


def filtered(shapes: list[dict]) -> list[dict]:
    """The shapes whose label contains ``$SEQMIX_BENCH_FILTER`` (all when unset), or any of
    its ``|``-separated parts (``d64|/4``)."""
    needles = [n for n in os.environ.get("SEQMIX_BENCH_FILTER", "").split("|") if n]
    return [s for s in shapes if not needles or any(n in s["label"] for n in needles)]


# --- forward and forward+backward rows against a reference implementation ---------------------


def nbytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def fwd_and_fb(f):
    """``(jit(f), jit(fb))`` where ``fb(*args, ct)`` returns ``(f(*args), vjp(ct))``."""
    fwd = jax.jit(f)

    def fb(*args):
        *args, ct = args
        y, vjp = jax.vjp(f, *args)
        return y, vjp(ct)

    return fwd, jax.jit(fb)


def measure(row: dict, fwd, fb, args, ct, copy_tbps: float | None):
    """Times ``fwd(*args)`` and ``fb(*args, ct)`` into ``row``: ms, GB/s of reading every
    input and writing every output once, and that read-once-write-once time at the copy
    ceiling (``*_x_rowo``); returns their outputs."""
    out = attempt(row, "fwd", lambda: jax.block_until_ready(fwd(*args)))
    if out is not None:
        t = attempt(row, "fwd", lambda: time_jax(fwd, *args))
        if t is not None:
            rowo = nbytes(args) + nbytes(out)
            row.update(fwd_ms=t * 1e3, fwd_gbs=rowo / t / 1e9)
            if copy_tbps:
                row["fwd_x_rowo"] = t / (rowo / (copy_tbps * 1e12))
    got = attempt(row, "fwd+bwd", lambda: jax.block_until_ready(fb(*args, ct)))
    if got is not None:
        t = attempt(row, "fwd+bwd", lambda: time_jax(fb, *args, ct))
        if t is not None:
            rowo = nbytes(args) + nbytes(ct) + nbytes(got)  # got = (y, grads)
            row.update(fb_ms=t * 1e3, fb_gbs=rowo / t / 1e9)
            if copy_tbps:
                row["fb_x_rowo"] = t / (rowo / (copy_tbps * 1e12))
        mem = compiled_bytes(fb, *args, ct)
        row["mem_mb"] = None if mem is None else mem / 2**20
    return out, got


def compare(row: dict, out, got, ref_out, ref_got, ref_row: dict | None):
    """Relative errors of y and the worst gradient against the reference row's, and its
    forward+backward time over this one's (``fb_vs_xla``)."""
    if out is not None and ref_out is not None:
        row["err_y"] = rel_err(out, ref_out)
    if got is not None and ref_got is not None:
        row["err_grad"] = max(
            rel_err(a, b) for a, b in zip(jax.tree.leaves(got[1]), jax.tree.leaves(ref_got[1]))
        )
    if ref_row is not None and row.get("fb_ms") and ref_row.get("fb_ms"):
        row["fb_vs_xla"] = ref_row["fb_ms"] / row["fb_ms"]


def iter_shapes(shapes, inputs, impls_for, columns, copy):
    """Times ``impls_for(shape)`` (name -> f) at every shape, yielding each row as it is
    measured; output and gradient errors against the first implementation (``xla`` when
    timed)."""
    for s in shapes:
        args, dy = inputs(s)
        ref = None
        for name, f in impls_for(s).items():
            row = {"impl": name, **s}
            fwd, fb = fwd_and_fb(f)
            out, got = measure(row, fwd, fb, args, dy, copy)
            if ref is None:
                ref = (out, got, row)
            else:
                compare(row, out, got, *ref)
            print({k: row.get(k) for k in columns}, flush=True)
            yield row
            del out, got
        del ref, args, dy


ROWO_COLUMNS = [
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


def plots(rows: list[dict], op: str, title: str) -> None:
    """Time against T per implementation (variant rows, ``impl[...]``, left out)."""
    dirs = [d for d in (os.environ.get("OUT"), RESULTS_DIR) if d and os.path.isdir(d)]
    for key, what in (("fwd_ms", "forward"), ("fb_ms", "forward+backward")):
        sel = [r for r in rows if r.get(key) and "[" not in r["impl"]]
        if len({r["T"] for r in sel}) < 2:
            continue
        name = f"{op}_{key[:-3]}.png"
        for d in dirs:
            try:
                plot_time_vs_length(
                    sel,
                    os.path.join(d, name),
                    x="T",
                    y=key,
                    group="impl",
                    title=f"{op} {what}, {title}",
                )
            except Exception as e:  # noqa: BLE001 - a plot must not lose the results
                print(f"plot {name} failed: {short_error(e)}")


def config_label(config) -> str:
    """A Config's set fields, compact (``{}`` for the table's)."""
    return json.dumps(tune.to_dict(config), sort_keys=True, separators=(",", ":"))


def autotune(
    fn, args, *, implementation: str, kwargs: dict | None = None, out: str | None, shape: str
):
    """``tune.autotune`` with the family's search axes, printing its trials."""
    print(f"tuning {fn.__name__} {implementation} at {shape}", flush=True)
    result = tune.autotune(
        fn, args, implementation=implementation, kwargs=kwargs, out=out, shape=shape
    )
    print(
        f"best {fn.__name__} {implementation} {result.key}: {config_label(result.best)}", flush=True
    )
    return result


# --- decoding steps ------------------------------------------------------------------------

STEP_IMPLS = ("xla", "pallas_triton")
STEP_BATCHES = (1, 16, 64, 256)
STEP_QUICK_BATCHES = (4,)
STEP_COLUMNS = ["label", "impl", "us", "gbs", "of_copy", "err", "error"]


def run_steps(op: str, case, quick: bool, ceilings: dict | None):
    """Rows of one decoding-step op: for each batch size B, ``case(B)`` gives ``(label,
    make(impl) -> jitted fn, args, bytes)``; every implementation of ``STEP_IMPLS`` is timed
    (microseconds, GB/s, the fraction of the copy ceiling) and compared with ``xla``."""
    copy = (ceilings or {}).get("copy_tbps")
    rows = new_rows()
    for B in STEP_QUICK_BATCHES if quick else STEP_BATCHES:
        label, make, args, nbytes = case(B)
        ref = None
        for impl in STEP_IMPLS:
            row = {"op": op, "impl": impl, "label": label, "B": B, "bytes": nbytes}
            fn = make(impl)
            out = attempt(row, "step", lambda fn=fn: fn(*args))
            if out is not None:
                t = attempt(row, "step", lambda fn=fn: time_jax(fn, *args))
                if t is not None:
                    row.update(us=t * 1e6, gbs=nbytes / t / 1e9)
                    if copy:
                        row["of_copy"] = row["gbs"] / (copy * 1e3)
                if impl == "xla":
                    ref = out
                elif ref is not None:
                    row["err"] = max(rel_err(a, r) for a, r in zip(out, ref))
            print({key: row.get(key) for key in STEP_COLUMNS}, flush=True)
            rows.append(row)
    return rows, STEP_COLUMNS
