"""One dispatch mechanism for every op family, and the interpret-mode switch.

Every public op takes ``implementation=``: ``None`` (auto: the first implementation in the
platform's preference list that supports the arguments), or a name from
``IMPLEMENTATIONS``. An implementation that cannot serve the arguments raises
``NotImplementedError`` with the reason; auto moves on to the next one, a named request
never falls back silently.

Pallas implementations run natively on their platform (``pallas_triton`` and
``pallas_mosaic_gpu`` on GPU, ``pallas_tpu`` on TPU) and anywhere in interpret mode, which
is on when the environment variable ``SEQMIX_INTERPRET=1`` is set or inside
``with interpret():``. Interpret mode makes Pallas kernels *askable by name* on a CPU; auto
dispatch never picks an interpreted kernel.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import os
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax

IMPLEMENTATIONS = (
    "naive",
    "xla",
    "pallas_triton",
    "pallas_mosaic_gpu",
    "pallas_tpu",
    "cudnn",
)

_PALLAS_PLATFORM = {"pallas_triton": "gpu", "pallas_mosaic_gpu": "gpu", "pallas_tpu": "tpu"}

_local = threading.local()


def interpret_mode() -> bool:
    """True when Pallas kernels should run in interpret mode (on the CPU)."""
    override = getattr(_local, "interpret", None)
    if override is not None:
        return override
    return os.environ.get("SEQMIX_INTERPRET", "0").strip().lower() in ("1", "true", "yes")


@contextlib.contextmanager
def interpret(enabled: bool = True) -> Iterator[None]:
    """Context manager that turns interpret mode on (or off) for Pallas kernels."""
    previous = getattr(_local, "interpret", None)
    _local.interpret = enabled
    try:
        yield
    finally:
        _local.interpret = previous


@contextlib.contextmanager
def target_platform(name: str) -> Iterator[None]:
    """Dispatch as if on platform ``name`` ("gpu" or "tpu"), for lowering on a CPU (see
    ``seqmix.testing.lower_for``): Pallas kernels are then built for that platform."""
    previous = getattr(_local, "platform", None)
    _local.platform = name
    try:
        yield
    finally:
        _local.platform = previous


def platform() -> str:
    """The platform ops run on: ``"cpu"``, ``"gpu"`` or ``"tpu"`` (the default backend, or
    the target of ``target_platform``)."""
    override = getattr(_local, "platform", None)
    if override is not None:
        return override
    backend = jax.default_backend()
    return "gpu" if backend in ("gpu", "cuda", "rocm") else backend


def available(name: str) -> bool:
    """Whether implementation ``name`` can run here (natively or in interpret mode)."""
    native = _PALLAS_PLATFORM.get(name)
    if native is not None:
        return platform() == native or interpret_mode()
    if name == "cudnn":
        return platform() == "gpu"
    return True


@dataclasses.dataclass(frozen=True)
class Op:
    """An op family's implementations and its auto-dispatch order per platform.

    Attributes:
      name: the op's public name, used in error messages.
      impls: implementation name -> callable, or ``"module:attribute"`` imported on first use
        (so that importing seqmix never imports a kernel backend).
      auto: platform -> implementation names in order of preference.
    """

    name: str
    impls: Mapping[str, Callable[..., Any] | str]
    auto: Mapping[str, Sequence[str]]

    def resolve(self, implementation: str) -> Callable[..., Any]:
        fn = self.impls[implementation]
        if isinstance(fn, str):
            module, _, attr = fn.partition(":")
            fn = getattr(importlib.import_module(module), attr)
        return fn

    def __call__(self, implementation: str | None, *args: Any, **kwargs: Any) -> Any:
        if implementation is None:
            reasons = []
            for name in self.auto.get(platform(), self.auto.get("cpu", ("xla",))):
                if name not in self.impls:
                    continue
                try:
                    return self.resolve(name)(*args, **kwargs)
                except NotImplementedError as e:
                    reasons.append(f"{name}: {e}")
            raise NotImplementedError(
                f"{self.name}: no implementation supports these arguments on "
                f"{platform()}: " + "; ".join(reasons)
            )
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(
                f"{self.name}: unknown implementation={implementation!r}; expected None or one "
                f"of {IMPLEMENTATIONS}"
            )
        if implementation not in self.impls:
            raise NotImplementedError(
                f"{self.name} has no {implementation!r} implementation; it has {tuple(self.impls)}"
            )
        if not available(implementation):
            native = _PALLAS_PLATFORM.get(implementation, "gpu")
            raise NotImplementedError(
                f"{self.name}: implementation={implementation!r} needs a {native.upper()} "
                f"(this is {platform()}); set SEQMIX_INTERPRET=1 to run Pallas kernels in "
                f"interpret mode"
                if implementation in _PALLAS_PLATFORM
                else f"{self.name}: implementation={implementation!r} needs a GPU"
            )
        return self.resolve(implementation)(*args, **kwargs)
