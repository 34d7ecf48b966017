"""Helpers shared by the kernel families: integer arithmetic of tiles, padding, the interpret
parameters of each Pallas backend, dtype guards and the GPU generation of this machine.

A new Pallas backend registers its interpret parameters in ``INTERPRET_PARAMS`` (beside its
name in ``dispatch.IMPLEMENTATIONS``) and gets them from ``interpret_params(name)``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from seqmix.kernels.dispatch import interpret_mode

# --- integer arithmetic of tiles ---------------------------------------------------------------


def cdiv(a, b):
    """``ceil(a / b)`` for ``a >= 0``, ``b > 0``: Python ints or traced integer scalars (inside
    a kernel)."""
    return (a + b - 1) // b


def round_up(n: int, m: int) -> int:
    """The smallest multiple of ``m`` that is ``>= n``."""
    return -(-n // m) * m


def pow2_at_least(n: int) -> int:
    """The smallest power of two ``>= n`` (1 for ``n <= 1``)."""
    return 1 << max(0, (n - 1).bit_length())


def pad_axes(x: jax.Array | None, sizes: dict[int, int], mode: str = "constant"):
    """``x`` padded at the end of the axes in ``sizes`` (``{axis: size}``) with zeros, or with
    its last entry for ``mode="edge"``; ``x`` itself when nothing changes, None for None."""
    if x is None:
        return None
    pads = [(0, 0)] * x.ndim
    for axis, size in sizes.items():
        pads[axis] = (0, size - x.shape[axis])
    if all(p == (0, 0) for p in pads):
        return x
    return jnp.pad(x, pads, mode=mode)


def pad_to(x: jax.Array, shape) -> jax.Array:
    """``x`` zero-padded at the end of every axis to ``shape``."""
    return jnp.pad(x, [(0, s - d) for d, s in zip(x.shape, shape)])


# --- elementwise math shared by kernels --------------------------------------------------------


def softplus(x):
    """``log(1 + exp(x))`` without overflow (a kernel-friendly form of ``jax.nn.softplus``)."""
    return jnp.maximum(x, 0.0) + jnp.log1p(jnp.exp(-jnp.abs(x)))


# --- dtype guards ------------------------------------------------------------------------------


def no_float64(*arrays) -> None:
    """Raises NotImplementedError when any array is float64: the Pallas kernels compute in
    float32 (the oracle and the XLA forms serve float64)."""
    if any(a is not None and a.dtype == jnp.float64 for a in arrays):
        raise NotImplementedError(
            "the Pallas kernels compute in float32; float64 inputs need "
            "the naive or xla implementation"
        )


# --- interpret mode per backend ----------------------------------------------------------------


def _tpu_params():
    from jax.experimental.pallas import tpu as pltpu

    # race detection and out-of-bounds checks come with the TPU interpreter
    return pltpu.InterpretParams(detect_races=True)


def _mosaic_gpu_params():
    from jax.experimental.pallas import mosaic_gpu as plgpu

    return plgpu.InterpretGPUParams()


# implementation name -> the ``interpret=`` value of its pallas_calls in interpret mode
INTERPRET_PARAMS: dict[str, Callable[[], Any]] = {
    "pallas_triton": lambda: True,
    "pallas_tpu": _tpu_params,
    "pallas_mosaic_gpu": _mosaic_gpu_params,
}


def interpret_params(implementation: str, enabled: bool | None = None) -> Any:
    """The ``interpret=`` argument of a ``pallas_call`` of ``implementation``: ``False`` when
    interpret mode is off (``enabled``, default ``dispatch.interpret_mode()``), else that
    backend's interpreter parameters."""
    if enabled is None:
        enabled = interpret_mode()
    if not enabled:
        return False
    try:
        return INTERPRET_PARAMS[implementation]()
    except KeyError:
        raise ValueError(
            f"no interpret parameters registered for implementation={implementation!r}; "
            f"registered: {sorted(INTERPRET_PARAMS)}"
        ) from None


# --- GPU generations ---------------------------------------------------------------------------

# device_kind substrings -> generation, first match wins (jax.Device.device_kind strings).
GENERATIONS = (
    (("GB200", "GB300", "B200", "B300", "B100", "RTX PRO 6000", "5090", "5080"), "blackwell"),
    (("H100", "H200", "H800", "H20", "GH200"), "hopper"),
    (("A100", "A800", "A30"), "ampere"),
    (
        (
            "A10",
            "A16",
            "A40",
            "A6000",
            "A5000",
            "A4000",
            "L4",
            "L40",
            "RTX 30",
            "RTX 40",
            "3090",
            "3080",
            "4090",
            "4080",
            "Ada",
        ),
        "ada",
    ),
)
DEFAULT_GENERATION = "hopper"  # the project's measured target (lowering checks on a CPU)


def generation(device_kind: str | None) -> str:
    """GPU generation of a ``jax.Device.device_kind`` string; ``None`` gives
    ``DEFAULT_GENERATION`` and an unknown kind ``"ampere"`` (conservative)."""
    if device_kind is None:
        return DEFAULT_GENERATION
    for needles, gen in GENERATIONS:
        if any(n.lower() in device_kind.lower() for n in needles):
            return gen
    return "ampere"


@functools.cache
def current_device_kind() -> str | None:
    """The first GPU's device kind, or ``None`` when this process has no GPU."""
    try:
        gpus = jax.devices("gpu")
    except RuntimeError:
        return None
    return gpus[0].device_kind if gpus else None
