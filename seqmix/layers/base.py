"""What every mixer shares: its config protocol, compute dtype and kernel implementation.

A mixer's config is an ``ml_collections.ConfigDict`` (or ``FrozenConfigDict``) holding the
mixer's own keys (``Mixer.default_config()``) plus the model-level keys ``COMMON``:

- ``d_model`` (int): width of the residual stream, the mixer's input and output.
- ``dtype`` (str): compute dtype, ``"float32"`` or ``"bfloat16"``; parameters stay float32.
- ``norm_eps`` (float): epsilon of the mixer's internal RMS norms.
- ``causal`` (bool): causal (decoder) or bidirectional (encoder).
- ``implementation`` (None, str or mapping op name -> str): the ``implementation=`` passed to
  the ``seqmix.kernels`` ops (None = auto).

``mixer_config(cls, d_model=..., **overrides)`` builds a complete one; a common key that
is absent takes its default from ``COMMON``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from seqmix import checks
from seqmix.kernels import dispatch

Array = jax.Array

COMMON: dict[str, Any] = {
    "d_model": 256,
    "dtype": "float32",
    "norm_eps": 1e-5,
    "causal": True,
    "implementation": None,
}

DTYPES = ("float32", "bfloat16", "float16")


def compute_dtype(name, key: str = "dtype") -> str:
    """Validates the config's ``dtype`` key and returns the dtype's name."""
    try:
        dtype = jnp.dtype(name).name
    except TypeError:
        dtype = None
    if dtype not in DTYPES:
        raise ValueError(f"{key} must be one of {DTYPES}, got {name!r}")
    return dtype


def freeze_implementation(
    implementation, key: str = "implementation"
) -> str | tuple[tuple[str, str], ...] | None:
    """The ``implementation`` key as a hashable value (modules keep only hashable statics),
    validated by ``seqmix.kernels.dispatch.check_implementation``: a misspelt op name or
    implementation is a ValueError naming it and listing the valid ones."""
    if isinstance(implementation, tuple):  # already frozen: ((op, name), ...)
        implementation = dict(implementation)
    dispatch.check_implementation(implementation, key)
    if implementation is None or isinstance(implementation, str):
        return implementation
    return tuple(sorted((str(k), v) for k, v in implementation.items()))


def size(config, key: str, *, minimum: int = 1, default: Any = None) -> int:
    """``config[key]`` as a whole number >= ``minimum`` (``seqmix.checks.as_int``): NumPy
    and JAX integer scalars accepted, booleans and fractions refused, naming ``key``. A key
    that is None takes ``default`` (when that is not None)."""
    value = config[key]
    if value is None and default is not None:
        return default
    return checks.as_int(value, key, minimum=minimum)


def optional_size(config, key: str, *, minimum: int = 1) -> int | None:
    """None, or ``size(config, key, minimum=minimum)``."""
    value = config[key]
    return None if value is None else checks.as_int(value, key, minimum=minimum)


def implementation_for(implementation, op: str) -> str | None:
    """The implementation to ask ``seqmix.kernels.<op>`` for."""
    if implementation is None or isinstance(implementation, str):
        return implementation
    return dict(implementation).get(op)


def common_key(config, key: str) -> Any:
    """``config[key]`` for a common key, or its default in ``COMMON`` when absent (so that
    a bare ``config.mixers.<name>`` section also builds a mixer, of width 256)."""
    try:
        return config[key]
    except (KeyError, AttributeError):
        return COMMON[key]


def divide(numerator: int, denominator: int, num_key: str, den_key: str) -> int:
    """``numerator // denominator``, raising a ValueError naming both keys otherwise."""
    if denominator < 1 or numerator % denominator:
        raise ValueError(f"{num_key} ({numerator}) must be divisible by {den_key} ({denominator})")
    return numerator // denominator


def cache_sizes(batch_size, max_length) -> tuple[int, int]:
    """``init_cache``'s arguments checked: ``batch_size`` a whole number >= 0,
    ``max_length`` >= 1 (a cache must hold at least the token being decoded)."""
    return (
        checks.as_int(batch_size, "batch_size", minimum=0),
        checks.positive_int(max_length, "max_length"),
    )


class Mixer(nnx.Module):
    """Base class of the sequence mixers.

    Subclasses define ``default_config()`` (their own keys with defaults), ``__init__(config,
    *, rngs)``, ``__call__(x, *, segment_ids=None, cache=None)`` (``x [B, T, d_model]`` ->
    ``y [B, T, d_model]`` in the compute dtype, or ``(y, new_cache)`` when a cache is given)
    and ``init_cache(batch_size, max_length)``.

    ``recurrent`` is True for mixers whose bidirectional form is a forward and a reversed
    pass (``seqmix.layers.Bidirectional``); attention is bidirectional by ``causal=False``.
    """

    recurrent: ClassVar[bool] = True

    @classmethod
    def default_config(cls) -> ml_collections.ConfigDict:
        raise NotImplementedError

    def _common(self, config) -> None:
        self.d_model = checks.positive_int(common_key(config, "d_model"), "d_model")
        self.dtype = compute_dtype(common_key(config, "dtype"))
        self.norm_eps = checks.positive_float(common_key(config, "norm_eps"), "norm_eps")
        self.causal = bool(common_key(config, "causal"))
        self.implementation = freeze_implementation(common_key(config, "implementation"))

    def impl(self, op: str) -> str | None:
        return implementation_for(self.implementation, op)

    def init_cache(self, batch_size: int, max_length: int) -> dict[str, Array]:
        raise NotImplementedError

    def _check_call(self, x, segment_ids, cache) -> None:
        if x.ndim != 3 or x.shape[-1] != self.d_model:
            raise ValueError(
                f"x must have shape [batch, time, d_model={self.d_model}], got {x.shape}"
            )
        if cache is not None:
            if not self.causal:
                raise ValueError("cache: a bidirectional (causal=False) mixer cannot decode")
            if segment_ids is not None:
                raise ValueError("segment_ids cannot be combined with cache (decoding)")


def mixer_config(cls, **overrides) -> ml_collections.ConfigDict:
    """``cls.default_config()`` plus the common keys, with ``overrides`` applied.

    Example: ``Attention(mixer_config(Attention, d_model=64, num_heads=4), rngs=nnx.Rngs(0))``.
    """
    values = dict(COMMON)
    values.update(cls.default_config().to_dict())
    unknown = sorted(set(overrides) - set(values))
    if unknown:
        raise ValueError(f"unknown keys {unknown} for {cls.__name__}; known: {sorted(values)}")
    values.update(overrides)
    return ml_collections.ConfigDict(values, type_safe=False)


def copy_config(config) -> ml_collections.ConfigDict:
    """A mutable, type-unsafe copy of a ConfigDict, FrozenConfigDict or mapping."""
    if isinstance(config, ml_collections.FrozenConfigDict):
        config = config.as_configdict()
    if isinstance(config, ml_collections.ConfigDict):
        config = config.to_dict()
    return ml_collections.ConfigDict(dict(config), type_safe=False)
