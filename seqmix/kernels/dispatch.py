"""One dispatch mechanism for every op family, and the interpret-mode switch.

Every public op takes ``implementation=``: ``None`` (auto: the first implementation in the
platform's preference list that supports the arguments and that the op's ``auto_skip``
rule, if any, does not pass over), or a name from ``IMPLEMENTATIONS``. An implementation
that cannot serve the arguments raises ``NotImplementedError`` with the reason; auto moves
on to the next one, a named request never falls back silently.

Pallas implementations run natively on their platform (``pallas_triton`` and
``pallas_mosaic_gpu`` on GPU, ``pallas_tpu`` on TPU) and anywhere in interpret mode, which
is on when the environment variable ``SEQMIX_INTERPRET=1`` is set or inside
``with interpret():``. Interpret mode makes Pallas kernels *askable by name* on a CPU; auto
dispatch never picks an interpreted kernel.

Every public op also takes ``config=``: the tuning Config of one backend (see
``seqmix.kernels.tune``). It is passed to that backend's implementation, which is called as
``impl(<normalised arrays>, *, <keyword args>, config=<Config or None>)``; implementations
without a Config class (naive, xla, cudnn) are called without it. A Config given with
``implementation=None`` selects its backend; a Config of another backend than the one named
is a ValueError.

A new backend registers its name here (``IMPLEMENTATIONS``, and its platform in
``PALLAS_PLATFORMS``), its interpret parameters in ``common.INTERPRET_PARAMS``, and its
implementation and Config class in each op's ``Op(impls=..., configs=...)``.
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

PALLAS_PLATFORMS = {"pallas_triton": "gpu", "pallas_mosaic_gpu": "gpu", "pallas_tpu": "tpu"}

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
    native = PALLAS_PLATFORMS.get(name)
    if native is not None:
        return platform() == native or interpret_mode()
    if name == "cudnn":
        return platform() == "gpu"
    return True


_OPS: dict[str, Op] = {}


def registered_ops() -> dict[str, Op]:
    """Public op name -> its ``Op``, for every op constructed so far (all of seqmix's once
    ``seqmix.kernels`` is imported)."""
    return dict(_OPS)


@dataclasses.dataclass(frozen=True)
class Op:
    """An op's implementations, their tuning Configs and its auto-dispatch order.

    Attributes:
      name: the op's public name, used in error messages.
      impls: implementation name -> callable, or ``"module:attribute"`` imported on first use
        (so that importing seqmix never imports a kernel backend).
      auto: platform -> implementation names in order of preference.
      configs: implementation name -> its Config class (the backends that are tuned).
      auto_skip: implementation name -> ``reason(*args, **kwargs)``, for an implementation
        that auto dispatch prefers only for some arguments (where it measured faster): the
        reason auto passes it over (a string), or None to try it. Named calls ignore it.
    """

    name: str
    impls: Mapping[str, Callable[..., Any] | str]
    auto: Mapping[str, Sequence[str]]
    configs: Mapping[str, type] = dataclasses.field(default_factory=dict)
    auto_skip: Mapping[str, Callable[..., str | None]] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        _OPS[self.name] = self

    def _backend_of(self, config, implementation: str | None) -> str | None:
        """The implementation ``config`` belongs to; checks it against a named one."""
        if config is None:
            return implementation
        owners = [name for name, cls in self.configs.items() if isinstance(config, cls)]
        if not owners:
            expected = ", ".join(f"{n}: {c.__qualname__}" for n, c in self.configs.items())
            raise ValueError(
                f"{self.name}: config must be the Config of one of its backends "
                f"({expected or 'none'}), got {type(config).__name__}"
            )
        if implementation is None:
            return owners[0]
        if implementation not in owners:
            raise ValueError(
                f"{self.name}: config is a {type(config).__qualname__} (for {owners[0]!r}) "
                f"but implementation={implementation!r}"
            )
        return implementation

    def _call(self, name: str, args, kwargs, config):
        if name in self.configs:
            kwargs = dict(kwargs, config=config)
        return self.resolve(name)(*args, **kwargs)

    def resolve(self, implementation: str) -> Callable[..., Any]:
        fn = self.impls[implementation]
        if isinstance(fn, str):
            module, _, attr = fn.partition(":")
            fn = getattr(importlib.import_module(module), attr)
        return fn

    def validate(self, implementation: str | None, config: Any = None) -> str | None:
        """The implementation a call would use (None: auto), after the checks a call makes
        before running one: a known name, a Config of that backend, an implementation this
        op has and that runs here. Ops call it directly for inputs they answer without an
        implementation (an empty batch), so that those fail for the same arguments."""
        if implementation is not None and (
            not isinstance(implementation, str) or implementation not in IMPLEMENTATIONS
        ):
            raise ValueError(
                f"{self.name}: unknown implementation={implementation!r}; expected None or one "
                f"of {IMPLEMENTATIONS}"
            )
        implementation = self._backend_of(config, implementation)
        if implementation is None:
            return None
        if implementation not in self.impls:
            raise NotImplementedError(
                f"{self.name} has no {implementation!r} implementation; it has {tuple(self.impls)}"
            )
        if not available(implementation):
            native = PALLAS_PLATFORMS.get(implementation, "gpu")
            raise NotImplementedError(
                f"{self.name}: implementation={implementation!r} needs a {native.upper()} "
                f"(this is {platform()}); set SEQMIX_INTERPRET=1 to run Pallas kernels in "
                f"interpret mode"
                if implementation in PALLAS_PLATFORMS
                else f"{self.name}: implementation={implementation!r} needs a GPU"
            )
        return implementation

    def __call__(
        self, implementation: str | None, *args: Any, config: Any = None, **kwargs: Any
    ) -> Any:
        implementation = self.validate(implementation, config)
        if implementation is None:
            reasons = []
            for name in self.auto.get(platform(), self.auto.get("cpu", ("xla",))):
                if name not in self.impls:
                    continue
                skip = self.auto_skip.get(name)
                reason = skip(*args, **kwargs) if skip is not None else None
                if reason is not None:
                    reasons.append(f"{name}: {reason}")
                    continue
                try:
                    return self._call(name, args, kwargs, None)
                except NotImplementedError as e:
                    reasons.append(f"{name}: {e}")
            raise NotImplementedError(
                f"{self.name}: no implementation supports these arguments on "
                f"{platform()}: " + "; ".join(reasons)
            )
        return self._call(implementation, args, kwargs, config)


def check_implementation(value: Any, name: str = "implementation") -> Any:
    """Validates an ``implementation`` setting of a layer or model config: None (auto), a
    name of ``IMPLEMENTATIONS``, or a mapping op name -> None or a name. Every key must be
    a registered op (``registered_ops()``: all of seqmix's once ``seqmix.kernels`` is
    imported) and every name one of that op's implementations; the ValueError names the
    key and lists the valid ones. Returns ``value`` unchanged."""
    if value is None:
        return value
    if isinstance(value, str):
        if value not in IMPLEMENTATIONS:
            raise ValueError(
                f"{name}: unknown implementation {value!r}; expected None, one of "
                f"{IMPLEMENTATIONS} or a mapping op name -> implementation"
            )
        return value
    items = value.items() if hasattr(value, "items") else None
    if items is None:
        raise ValueError(
            f"{name} must be None, an implementation name or a mapping op name -> "
            f"implementation, got {value!r}"
        )
    for op, impl in items:
        if op not in _OPS:
            raise ValueError(
                f"{name}: unknown op {op!r} in the mapping; the ops are {sorted(_OPS)}"
            )
        if impl is not None and (not isinstance(impl, str) or impl not in _OPS[op].impls):
            raise ValueError(
                f"{name}[{op!r}]: {impl!r} is not an implementation of {op}; it has "
                f"{tuple(_OPS[op].impls)} (or None: auto)"
            )
    return value
