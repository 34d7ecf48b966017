"""Timing, ceilings and result files shared by the kernel benchmarks.

Protocol (DESIGN.md): compile first, warm up, enqueue ``n`` calls back to back and block
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
import statistics
import time
import traceback
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

RESULTS_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "results")


def time_jax(fn: Callable, *args, reps: int = 5, target_s: float = 0.2, max_n: int = 200) -> float:
    """Median seconds per call of a jitted ``fn(*args)``: n calls enqueued, one block."""
    jax.block_until_ready(fn(*args))  # compile
    jax.block_until_ready(fn(*args))  # warm up
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    one = max(time.perf_counter() - t0, 1e-6)
    n = int(min(max_n, max(3, target_s / one)))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = None
        for _ in range(n):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / n)
    return statistics.median(times)


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
    for mod in ("torch", "triton", "fla"):
        with contextlib.suppress(Exception):  # a broken optional peer only loses its line
            env[mod] = __import__(mod).__version__
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
    """``(rows, columns, json path)`` of ``module.run(op, ...)``, written as JSON. When a time
    limit interrupts it (SIGINT), the rows measured so far (``live_rows``) are written,
    with ``interrupted`` among the ceilings."""
    try:
        rows, columns = module.run(op, quick=quick, ceilings=ceilings)
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
