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
"""

import os
import re

GPU_MARK = re.compile(r"(?<!not )\bgpu\b")


def _gpu_selected(config) -> bool:
    markexpr = config.getoption("markexpr", default="") or ""
    return bool(GPU_MARK.search(markexpr)) and "not gpu" not in markexpr


def pytest_configure(config):
    if _gpu_selected(config) or os.environ.get("SEQMIX_TEST_DEVICE", "") == "gpu":
        os.environ["SEQMIX_TEST_DEVICE"] = "gpu"
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    else:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")


def pytest_collection_modifyitems(config, items):
    if os.environ.get("SEQMIX_TEST_DEVICE") != "gpu":
        return
    import jax
    import pytest

    try:
        has_gpu = bool(jax.devices("gpu"))
    except RuntimeError:
        has_gpu = False
    if not has_gpu:
        skip = pytest.mark.skip(reason="pytest -m gpu: no GPU visible to JAX on this machine")
        for item in items:
            item.add_marker(skip)
