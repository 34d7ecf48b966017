"""Argument checks shared by the op families: errors name the argument and what was expected."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16, jnp.float64)


def check_array(
    name: str,
    x,
    ndim: int,
    layout: str,
    *,
    dtypes: Sequence = FLOAT_DTYPES,
    shape: Sequence[int | None] | None = None,
):
    """Checks rank, dtype and (where given, None = any) shape of argument ``name``."""
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise ValueError(f"{name} must be an array {layout}, got {type(x).__name__}")
    if x.ndim != ndim:
        raise ValueError(f"{name} must have rank {ndim} {layout}, got shape {tuple(x.shape)}")
    if dtypes is not None and not any(jnp.dtype(x.dtype) == jnp.dtype(d) for d in dtypes):
        names = ", ".join(jnp.dtype(d).name for d in dtypes)
        raise ValueError(f"{name} has dtype {x.dtype}; expected one of {names}")
    if shape is not None:
        for got, want in zip(x.shape, shape):
            if want is not None and got != want:
                raise ValueError(
                    f"{name} must have shape {layout} = "
                    f"{tuple('*' if w is None else w for w in shape)}, got {tuple(x.shape)}"
                )
    return x


def check_int_array(name: str, x, ndim: int, layout: str, shape: Sequence[int | None]):
    if not hasattr(x, "dtype") or not jnp.issubdtype(x.dtype, jnp.integer):
        raise ValueError(f"{name} must be an integer array {layout}")
    return check_array(name, x, ndim, layout, dtypes=None, shape=shape)


def check_heads(big_name: str, big: int, small_name: str, small: int) -> int:
    """Returns big // small, raising when the head counts do not divide."""
    if small < 1 or big % small:
        raise ValueError(
            f"the number of heads of {big_name} ({big}) must be a multiple of the number of "
            f"heads of {small_name} ({small})"
        )
    return big // small


def is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def check_nonpositive(name: str, x) -> None:
    """Raises when a concrete ``x`` has an element > 0 (skipped under tracing)."""
    if x is None or not is_concrete(x):
        return
    if bool(np.any(np.asarray(x, dtype=np.float32) > 0)):
        raise ValueError(
            f"{name} must be <= 0 everywhere (it is a log decay), got a maximum of "
            f"{float(np.max(np.asarray(x, dtype=np.float32)))}"
        )


def default_scale(scale: float | None, dim: int) -> float:
    return float(dim) ** -0.5 if scale is None else float(scale)


def accum_dtype(dtype) -> jnp.dtype:
    """float32, or float64 for float64 inputs (oracle precision when x64 is enabled)."""
    return jnp.dtype(jnp.float64) if jnp.dtype(dtype) == jnp.float64 else jnp.dtype(jnp.float32)
