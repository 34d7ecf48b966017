"""The test base every op's case table runs on.

Each op has one case table (``tests/kernels/<family>/cases.py``): a case names the
implementations that run it on the CPU (in interpret mode, in CI), and on a GPU with
``pytest -m gpu`` every case runs natively on each of the op's GPU implementations (the
case's own choice of CPU implementations does not matter there). ``params`` turns a table
into pytest parameters for the current run; ``compare`` checks one implementation against
the float32 oracle (outputs, final states and every gradient) by
``seqmix.testing.check_against``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence

import pytest

from seqmix import testing
from seqmix.kernels import interpret

# The interpreted kernels are large programs that run once: compiling them without the
# backend's optimisation passes halves their test time (CPU runs only).
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def params(cases: Sequence, gpu_implementations: Sequence[str]) -> list:
    """``(case, implementation)`` pytest parameters: on the CPU the implementations of each
    case's ``cpu`` field; under ``pytest -m gpu`` every case on each of
    ``gpu_implementations``, marked ``gpu``."""
    if testing.native_run():
        return [
            pytest.param(c, impl, id=f"{c.name}-{impl}", marks=pytest.mark.gpu)
            for c in cases
            for impl in gpu_implementations
        ]
    return [pytest.param(c, impl, id=f"{c.name}-{impl}") for c in cases for impl in c.cpu]


@contextlib.contextmanager
def mode() -> Iterator[None]:
    """Interpret mode on the CPU; the device's own kernels under ``pytest -m gpu``."""
    with interpret(not testing.native_run()):
        yield


def compare(
    fn: Callable,
    ref: Callable,
    args: Sequence,
    *,
    argnums: Sequence[int],
    names: Sequence[str],
    tol: float,
    grad_tol: float | Mapping[str, float] | None = None,
    seed: int,
    fast_compile: bool = False,
) -> None:
    """``testing.check_against`` in the run's mode. Under ``pytest -m gpu`` every case runs
    on every GPU implementation, so ``NotImplementedError`` there (an implementation that
    cannot serve the case, e.g. cuDNN with a softcap) skips the test with its reason; on the
    CPU a case runs only on the implementations it names, and it fails. ``fast_compile``
    compiles each side without the CPU backend's optimisation passes (interpret mode)."""
    options = FAST_COMPILE if fast_compile and not testing.native_run() else None
    with mode():
        try:
            testing.check_against(
                fn,
                ref,
                args,
                argnums=argnums,
                names=names,
                tol=tol,
                grad_tol=grad_tol,
                seed=seed,
                compiler_options=options,
            )
        except NotImplementedError as e:
            if not testing.native_run():
                raise
            pytest.skip(f"not served: {e}")


def skip_unserved(fn: Callable, *args, **kwargs):
    """``fn(*args, **kwargs)``, skipping the test where an implementation does not serve the
    case under ``pytest -m gpu`` (see ``compare``)."""
    try:
        return fn(*args, **kwargs)
    except NotImplementedError as e:
        if not testing.native_run():
            raise
        pytest.skip(f"not served: {e}")


def assert_no_races() -> None:
    """The TPU interpreter's race detector found no race in the last kernel it ran."""
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call

    races = interpret_pallas_call.races
    assert races is not None and not races.races_found, "data race in the TPU kernel"
