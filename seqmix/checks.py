"""Checks of scalar arguments and config values, shared by kernels, layers, models and data.

Every check names the argument, says what was given and what was expected:

- ``as_int``: a whole number. Accepted: Python ints, NumPy and JAX integer scalars
  (``np.int64(2)``, ``jnp.int32(2)``, 0-d integer arrays) and floats with no fractional part
  (``2.0``). Refused: booleans (``TypeError``: ``True`` is not a size), floats with a
  fraction (``ValueError``), anything else (``TypeError``). ``minimum`` bounds it below.
- ``as_float``: a real number (Python, NumPy or JAX scalar; booleans and strings refused),
  finite unless ``finite=False``, and above ``minimum`` (``> minimum`` when
  ``strict=True``).
- ``token_range``: integer token ids inside ``[0, vocab_size)``, checked on the host when
  their values are known.

Values inside ``jax.jit`` are traced and cannot be checked on the host; there token ids are
checked by ``jax.experimental.checkify`` when ``traced_checks()`` is on (see ``token_range``).
"""

from __future__ import annotations

import contextlib
import math
import numbers
import os
import threading
from collections.abc import Iterator

import jax
import numpy as np

_local = threading.local()


def _describe(value) -> str:
    return f"{value!r} ({type(value).__name__})"


def _scalar(value, name: str):
    """A 0-d NumPy/JAX array or NumPy scalar as a Python number; tracers refused."""
    if isinstance(value, jax.core.Tracer):
        raise TypeError(f"{name} must be a static Python number, got a traced value {value}")
    if isinstance(value, (np.ndarray, jax.Array)):
        if value.ndim != 0:
            raise TypeError(f"{name} must be a scalar, got an array of shape {value.shape}")
        value = np.asarray(value)[()]
    if isinstance(value, np.generic):
        value = value.item()
    return value


def as_int(value, name: str, *, minimum: int | None = None) -> int:
    """``value`` as a Python int (see the module docstring), ``>= minimum`` when given."""
    want = "an integer" + ("" if minimum is None else f" >= {minimum}")
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be {want}, got the bool {value!r}")
    original = value
    value = _scalar(value, name)
    if isinstance(value, bool):
        raise TypeError(f"{name} must be {want}, got the bool {original!r}")
    if isinstance(value, numbers.Integral):
        value = int(value)
    elif isinstance(value, numbers.Real):
        if not (math.isfinite(value) and float(value).is_integer()):
            raise ValueError(f"{name} must be {want}, got {_describe(original)}")
        value = int(value)
    else:
        raise TypeError(f"{name} must be {want}, got {_describe(original)}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be {want}, got {value}")
    return value


def positive_int(value, name: str) -> int:
    """``as_int(value, name, minimum=1)``: a size that must be at least 1."""
    return as_int(value, name, minimum=1)


def optional_int(value, name: str, *, minimum: int | None = None) -> int | None:
    """None, or ``as_int(value, name, minimum=minimum)``."""
    return None if value is None else as_int(value, name, minimum=minimum)


def as_float(
    value,
    name: str,
    *,
    minimum: float | None = None,
    strict: bool = False,
    finite: bool = True,
) -> float:
    """``value`` as a Python float: finite (unless ``finite=False``) and ``>= minimum``
    (``> minimum`` with ``strict``) when given."""
    parts = ["a finite number" if finite else "a number"]
    if minimum is not None:
        parts.append(f"{'>' if strict else '>='} {minimum}")
    want = " ".join(parts)
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be {want}, got the bool {value!r}")
    original = value
    value = _scalar(value, name)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {want}, got {_describe(original)}")
    value = float(value)
    if finite and not math.isfinite(value):
        raise ValueError(f"{name} must be {want}, got {value}")
    if minimum is not None and (value <= minimum if strict else value < minimum):
        raise ValueError(f"{name} must be {want}, got {value}")
    return value


def positive_float(value, name: str) -> float:
    """A finite number > 0 (a scale, an epsilon, a rope theta)."""
    return as_float(value, name, minimum=0.0, strict=True)


def is_concrete(x) -> bool:
    """True when ``x``'s values are known on the host (not a tracer inside a transform)."""
    return not isinstance(x, jax.core.Tracer)


def traced_checks_enabled() -> bool:
    """True inside ``with traced_checks():`` or when ``SEQMIX_CHECKS=1``."""
    override = getattr(_local, "traced", None)
    if override is not None:
        return override
    return os.environ.get("SEQMIX_CHECKS", "0").strip().lower() in ("1", "true", "yes")


@contextlib.contextmanager
def traced_checks(enabled: bool = True) -> Iterator[None]:
    """Adds ``jax.experimental.checkify`` checks of values that are traced (token ids under
    ``jit``) to the functions traced inside this context. Such a function must then be run
    through ``checkify.checkify`` (a ``checkify.check`` outside it fails when traced)::

        from jax.experimental import checkify

        with seqmix.checks.traced_checks():
            err, logits = checkify.checkify(jax.jit(lambda t: model(t)))(tokens)
        err.throw()  # ValueError-like JaxRuntimeError naming the token

    The setting is read when a function is traced: a function jitted before is not changed.
    Off by default, so jitted training steps carry no extra work.
    """
    previous = getattr(_local, "traced", None)
    _local.traced = enabled
    try:
        yield
    finally:
        _local.traced = previous


def token_range(tokens, vocab_size: int, name: str = "tokens") -> None:
    """Raises ValueError when concrete integer ``tokens`` hold an id outside
    ``[0, vocab_size)``, naming the first such position. Traced tokens are checked with
    ``checkify.check`` inside ``traced_checks()`` and not at all otherwise (no host sync)."""
    if not is_concrete(tokens):
        if traced_checks_enabled() and tokens.size:
            import jax.numpy as jnp
            from jax.experimental import checkify

            checkify.check(
                jnp.all((tokens >= 0) & (tokens < vocab_size)),
                f"{name} holds ids outside the vocabulary [0, {vocab_size}): "
                "min {lo}, max {hi}",
                lo=jnp.min(tokens),
                hi=jnp.max(tokens),
            )
        return
    id_range(tokens, vocab_size, name)


def id_range(ids, limit: int, name: str, what: str = "the vocabulary") -> None:
    """ValueError naming ``name`` and the first bad position when the concrete integer
    array ``ids`` holds a value outside ``[0, limit)`` (``what`` names that range)."""
    values = np.asarray(ids)
    if values.size == 0:
        return
    if not np.issubdtype(values.dtype, np.integer):
        raise ValueError(f"{name} must hold integer ids, got dtype {values.dtype}")
    lo, hi = int(values.min()), int(values.max())
    if lo >= 0 and hi < limit:
        return
    bad = np.argwhere((values < 0) | (values >= limit))
    where = tuple(int(i) for i in bad[0])
    raise ValueError(
        f"{name} holds ids outside {what} [0, {limit}): "
        f"{name}[{', '.join(map(str, where))}] = {int(values[where])} "
        f"({len(bad)} such ids; min {lo}, max {hi})"
    )
