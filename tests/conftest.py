"""Test settings: the CPU by default; the GPU for ``pytest -m gpu``.

``python -m pytest -n 2 -q tests`` runs everything on the CPU (one device unless a test asks
for more in a subprocess), the Pallas kernels in interpret mode.

``python -m pytest -m gpu -n 8 -q tests`` on a GPU machine runs every op's forward, backward
and decoding cases natively on the GPU's implementations (interpret mode off) against the
float32 oracle: the mark expression selects the ``gpu`` tests and leaves the GPU visible
(``SEQMIX_TEST_DEVICE=gpu`` does the same for any selection). It sets
``SEQMIX_TEST_DEVICE=gpu`` for the test modules and turns off the preallocation of device
memory (several xdist workers share the GPU); the oracle runs its matmuls at full float32
precision (``seqmix.testing.vjp_pairs``). Without a GPU the selected tests are skipped.

On the CPU, XLA compiles with its cheapest pipeline (``FAST_CPU_COMPILE`` as ``XLA_FLAGS``
unless the caller set them), and every program that takes a while to compile is compiled
once per test run: the run shares a persistent compilation cache (a temporary directory,
removed at the end) among its xdist workers and the subprocesses the tests start
(``JAX_COMPILATION_CACHE_DIR`` in the environment). Many tests train the same small
models; a program that differs in anything (code, shapes, flags, devices) is a different
cache entry and compiles anew.
"""

import os
import re
import shutil
import tempfile

import pytest

GPU_MARK = re.compile(r"(?<!not )\bgpu\b")
FAST_CPU_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
_CACHE_KEY = pytest.StashKey[str]()


def _gpu_selected(config) -> bool:
    markexpr = config.getoption("markexpr", default="") or ""
    return bool(GPU_MARK.search(markexpr)) and "not gpu" not in markexpr


def pytest_configure(config):
    if _gpu_selected(config) or os.environ.get("SEQMIX_TEST_DEVICE", "") == "gpu":
        os.environ["SEQMIX_TEST_DEVICE"] = "gpu"
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    else:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        # XLA's cheapest CPU pipeline: the suite's programs are tiny and compile-bound (the
        # interpret-mode kernels above all), and these flags cut their compile time by ~40%.
        # Inherited by the xdist workers and every subprocess, so all compile alike.
        os.environ.setdefault("XLA_FLAGS", FAST_CPU_COMPILE)
        _share_compilations(config)


def _share_compilations(config) -> None:
    """One persistent compilation cache for this run: made by the first process (the xdist
    controller, or the only one), inherited through the environment by the workers and
    every subprocess. A cache the caller set is used as it is."""
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return
    path = tempfile.mkdtemp(prefix="seqmix-tests-jax-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = path
    # the tiny programs that compile in milliseconds are not worth a file each
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
    config.stash[_CACHE_KEY] = path


def pytest_unconfigure(config):
    path = config.stash.get(_CACHE_KEY, None)
    if path is not None:
        shutil.rmtree(path, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    if os.environ.get("SEQMIX_TEST_DEVICE") != "gpu":
        return
    import jax

    try:
        has_gpu = bool(jax.devices("gpu"))
    except RuntimeError:
        has_gpu = False
    if not has_gpu:
        skip = pytest.mark.skip(reason="pytest -m gpu: no GPU visible to JAX on this machine")
        for item in items:
            item.add_marker(skip)
