"""Compile many programs in parallel processes into JAX's persistent cache, before timing.

A GPU run of many distinct programs (bench_model's 20 models, the recall sweep's grid)
spends most of its time compiling, and one process compiles one program at a time.
``run_workers`` starts N copies of a script with ``--compile_only=i/N``; each compiles its
share (``shard``) into ``CACHE_DIR`` and exits; the driver then runs everything, and each of
its compiles is a cache hit (seconds instead of tens of seconds). Workers neither
preallocate device memory nor run anything; they are killed at ``budget_s``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

CACHE_DIR = os.path.join(tempfile.gettempdir(), "seqmix_jax_cache")


def setup_cache() -> None:
    """Every compile of this process is written to, and looked up in, ``CACHE_DIR``."""
    import jax

    os.makedirs(CACHE_DIR, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", CACHE_DIR)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def shard(items: list, spec: str) -> list:
    """The items of worker ``i`` of ``n`` (``spec`` is ``"i/n"``): every n-th from i."""
    i, n = (int(x) for x in spec.split("/"))
    if not 0 <= i < n:
        raise ValueError(f"--compile_only must be 'i/n' with 0 <= i < n, got {spec!r}")
    return items[i::n]


def run_workers(module: str, args: list[str], n: int, budget_s: float) -> float:
    """Runs ``python -m module --compile_only=i/n *args`` for i < n at once and waits at most
    ``budget_s`` seconds (then kills what still runs); returns the seconds taken."""
    os.makedirs(CACHE_DIR, exist_ok=True)
    # each process gets an equal share of the device memory: with the caller's fraction each
    # (0.9 under run.sh), 8 processes' autotuning runs the device out of memory (hundreds of
    # allocator retries), and XLA may then time fewer candidate kernels
    share = float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.75")) / max(n, 1)
    env = dict(
        os.environ,
        XLA_PYTHON_CLIENT_PREALLOCATE="false",
        XLA_PYTHON_CLIENT_MEM_FRACTION=f"{share:.3f}",
    )
    t0 = time.time()
    procs = [
        subprocess.Popen([sys.executable, "-m", module, f"--compile_only={i}/{n}", *args], env=env)
        for i in range(n)
    ]
    deadline = t0 + budget_s
    for p in procs:
        try:
            p.wait(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    return time.time() - t0
