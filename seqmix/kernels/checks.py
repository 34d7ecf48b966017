"""Argument checks shared by the op families: errors name the argument and what was expected.

Scalar arguments go through ``seqmix.checks`` (``as_int``: Python, NumPy and JAX integer
scalars accepted, booleans refused; ``as_float``: finite numbers). Empty inputs: a batch or
a sequence of size 0 is computed by every op as ``jnp`` computes an empty reduction (an
empty output; a final state equal to the initial state, or zeros), in the api layer before
dispatch, so that every implementation behaves the same (``empty``); heads and feature
sizes of 0 are refused (``check_sizes``).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from seqmix.checks import as_float, as_int, is_concrete, optional_int  # noqa: F401

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


def check_nonpositive(name: str, x, why: str = "it is a log decay") -> None:
    """Raises when a concrete ``x`` has an element > 0 (skipped under tracing)."""
    if x is None or not is_concrete(x) or x.size == 0:
        return
    values = np.asarray(x, dtype=np.float32)
    if bool(np.any(values > 0)):
        raise ValueError(
            f"{name} must be <= 0 everywhere ({why}), got a maximum of {float(np.max(values))}"
        )


# The log decay below which a step is a hard reset. exp(-110) is 0 in float32 (and in the
# exp2 of every kernel), so a state carried across such a step contributes exactly 0, as with
# -inf; but -inf itself would make the chunked forms' differences of cumulative log decays
# -inf - (-inf) = NaN. Decays are floored at this value; the gradient below it is 0.
LOG_DECAY_FLOOR = -110.0


def floor_log_decay(g):
    """``max(g, LOG_DECAY_FLOOR)``: ``-inf`` (a hard reset) and any log decay below the floor
    act as a reset in every implementation; NaN stays NaN."""
    return jnp.maximum(g, jnp.asarray(LOG_DECAY_FLOOR, g.dtype))


def check_sizes(name: str, x, layout: str, axes: Sequence[int]) -> None:
    """Raises when an axis of ``x`` in ``axes`` (heads, feature sizes) is 0."""
    names = [a.strip() for a in layout.strip("[]").split(",")]
    for axis in axes:
        if x.shape[axis] < 1:
            raise ValueError(
                f"{name} must have {names[axis]} >= 1 ({name} is {layout}), got shape "
                f"{tuple(x.shape)}"
            )


def empty(*sizes: int) -> bool:
    """True when a batch or sequence size is 0: the op returns its empty result."""
    return any(s == 0 for s in sizes)


def check_lengths(name: str, lengths, high: int) -> None:
    """Raises when concrete ``lengths`` hold a value outside ``[0, high]`` (skipped under
    tracing: no host sync inside ``jit``)."""
    if not is_concrete(lengths) or lengths.size == 0:
        return
    values = np.asarray(lengths)
    bad = np.flatnonzero((values < 0) | (values > high))
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"{name} must lie in [0, {high}] (the cache size), got {name}[{i}] = {int(values[i])}"
        )


def check_softcap(softcap) -> float | None:
    """None, or a finite number > 0."""
    if softcap is None:
        return None
    return as_float(softcap, "softcap", minimum=0.0, strict=True)


def default_scale(scale: float | None, dim: int) -> float:
    """``dim ** -0.5`` when ``scale`` is None, else ``scale`` as a finite float."""
    return float(dim) ** -0.5 if scale is None else as_float(scale, "scale")


def accum_dtype(dtype) -> jnp.dtype:
    """float32, or float64 for float64 inputs (oracle precision when x64 is enabled)."""
    return jnp.dtype(jnp.float64) if jnp.dtype(dtype) == jnp.float64 else jnp.dtype(jnp.float32)
