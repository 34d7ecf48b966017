"""The one tuning mechanism of seqmix's kernels: how a call's Config is resolved, the tuning
file that overrides the tables, and the autotuner that writes that file.

Every Pallas backend of an op has a frozen Config dataclass in its family's ``tuning.py``
(``seqmix.kernels.attention.tuning.TritonConfig``, ...), accepted by the public op as
``config=``. Its fields default to None, "the table's value". The Config a call runs with is

1. the family table's row for this GPU generation (``common.generation``; interpret mode has
   rows of its own) and the call's key (e.g. the head dim ``"d64"``, the decay kind), then
2. the fields of the tuning file's entry for (op, implementation, key), when the environment
   variable ``SEQMIX_TUNING`` names a file (not in interpret mode), then
3. the fields that the caller's ``config=`` sets.

A field that is still None after that means "computed per call" (documented per field).

The tuning file is JSON, one format for every op, as ``autotune(..., out=path)`` writes it::

    {"attention": {"pallas_triton": {"d64": {
        "config": {"fwd": {"block_q": 128, "block_k": 64, "num_warps": 8, "num_stages": 3}},
        "ms": 1.58, "device": "NVIDIA H200", "shape": "..."}}}}

Its entries apply on any device while the variable is set, and the file is read again when
it changes. To retune on a new GPU::

    from seqmix import kernels
    from seqmix.kernels import tune
    tune.autotune(kernels.attention, (q, k, v), kwargs=dict(causal=True),
                  implementation="pallas_triton", out="tuning.json")
    # then: export SEQMIX_TUNING=$PWD/tuning.json

The search is coordinate-wise over the family's ``SEARCH`` axes (one Config field at a
time, the others at their best so far), or exhaustive over ``candidates``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import json
import os
import statistics
import threading
import time
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

ENV = "SEQMIX_TUNING"

# --- Configs as data ---------------------------------------------------------------------------


def merge(base, top):
    """``base`` with every field that ``top`` sets (not None) replaced; nested Configs merge
    field by field. Either may be None."""
    if top is None:
        return base
    if base is None:
        return top
    if type(base) is not type(top):
        raise ValueError(f"cannot merge a {type(top).__name__} into a {type(base).__name__}")
    changes = {}
    for field in dataclasses.fields(top):
        value = getattr(top, field.name)
        if value is None:
            continue
        old = getattr(base, field.name)
        if dataclasses.is_dataclass(value) and dataclasses.is_dataclass(old):
            value = merge(old, value)
        changes[field.name] = value
    return dataclasses.replace(base, **changes)


def to_dict(config) -> dict:
    """The fields a Config sets (nested Configs as dicts), for JSON."""
    out = {}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if value is None:
            continue
        out[field.name] = to_dict(value) if dataclasses.is_dataclass(value) else value
    return out


@functools.cache
def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _nested_type(hint) -> type | None:
    for arg in (hint, *typing.get_args(hint)):
        if isinstance(arg, type) and dataclasses.is_dataclass(arg):
            return arg
    return None


def from_dict(cls, data: Mapping, *, where: str = "config"):
    """A ``cls`` Config from ``to_dict``'s form; unknown fields raise ValueError naming them."""
    if not isinstance(data, Mapping):
        raise ValueError(f"{where} must be a JSON object of {cls.__name__} fields, got {data!r}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(
            f"{where}: unknown fields {unknown} for {cls.__name__}; expected some of "
            f"{sorted(names)}"
        )
    kwargs = {}
    for name, value in data.items():
        nested = _nested_type(_hints(cls)[name])
        if nested is not None and isinstance(value, Mapping):
            value = from_dict(nested, value, where=f"{where}.{name}")
        kwargs[name] = value
    return cls(**kwargs)


# --- the tuning file ---------------------------------------------------------------------------


def read_file(path: str) -> dict:
    """The tuning file at ``path`` (``{}`` for ``""``); read again when it changes."""
    if not path:
        return {}
    try:
        stamp = os.stat(path).st_mtime_ns
    except OSError as e:
        raise ValueError(f"{ENV}={path!r}: not a readable tuning JSON file ({e})") from e
    return _read(path, stamp)


@functools.lru_cache(maxsize=8)
def _read(path: str, stamp: int) -> dict:
    del stamp  # part of the cache key only
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{ENV}={path!r}: not a readable tuning JSON file ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{ENV}={path!r}: expected a JSON object {{op: {{implementation: ...}}}}")
    return data


def override(op: str, implementation: str, key: str, cls):
    """The ``SEQMIX_TUNING`` file's Config for (op, implementation, key), or None."""
    path = os.environ.get(ENV, "")
    entry = read_file(path).get(op, {}).get(implementation, {}).get(key)
    if entry is None:
        return None
    where = f"{ENV}={path!r}: {op}.{implementation}.{key}.config"
    if not isinstance(entry, Mapping) or "config" not in entry:
        raise ValueError(f"{where}: an entry must hold a 'config' object, got {entry!r}")
    return from_dict(cls, entry["config"], where=where)


# --- resolution --------------------------------------------------------------------------------

_local = threading.local()


@contextlib.contextmanager
def recording() -> Iterator[list[tuple[str, str, str]]]:
    """Collects the (op, implementation, key) of every Config resolved inside."""
    previous = getattr(_local, "log", None)
    _local.log = log = []
    try:
        yield log
    finally:
        _local.log = previous


def resolve(
    op: str,
    implementation: str,
    key: str,
    default,
    config,
    *,
    interpret: bool,
    adjust: Callable[[Any], Any] | None = None,
):
    """The Config a call runs with (module docstring): ``default`` (the table's row), then
    the tuning file's entry (not in interpret mode), then ``adjust`` (a per-call fix-up of
    the table's values, such as halving a tile for float32), then ``config``'s fields."""
    cls = type(default)
    if config is not None and not isinstance(config, cls):
        raise ValueError(
            f"{op}: config for implementation={implementation!r} must be a "
            f"{cls.__module__}.{cls.__qualname__}, got {type(config).__name__}"
        )
    log = getattr(_local, "log", None)
    if log is not None:
        log.append((op, implementation, key))
    resolved = default if interpret else merge(default, override(op, implementation, key, cls))
    if adjust is not None:
        resolved = adjust(resolved)
    return merge(resolved, config)


# --- timing ------------------------------------------------------------------------------------


def time_call(fn: Callable, *args, reps: int = 5, target_s: float = 0.2, max_n: int = 200) -> float:
    """Median seconds per call of a jitted ``fn(*args)``: compile, warm up, then ``n`` calls
    enqueued back to back and blocked on once, ``reps`` times."""
    jax.block_until_ready(fn(*args))  # compile
    jax.block_until_ready(fn(*args))  # warm up
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    one = max(time.perf_counter() - t0, 1e-6)
    n = int(min(max_n, max(3, target_s / one)))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = None
        for _ in range(n):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / n)
    return statistics.median(times)


# --- the autotuner -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Axis:
    """One coordinate of a search: Config field ``field`` over ``values``, timed forward only
    or forward + backward (``backward``)."""

    field: str
    values: Sequence[Any]
    backward: bool = False


@dataclasses.dataclass(frozen=True)
class Trial:
    config: Any
    seconds: float | None
    backward: bool
    error: str | None = None


@dataclasses.dataclass(frozen=True)
class Result:
    """The best Config found for (op, implementation, key), and every trial."""

    op: str
    implementation: str
    key: str
    best: Any
    seconds: float | None
    trials: tuple[Trial, ...]


def family_tuning(fn: Callable):
    """The ``tuning`` module of public op ``fn``'s family (``seqmix.kernels.<family>.api`` ->
    ``seqmix.kernels.<family>.tuning``)."""
    module = getattr(fn, "__module__", "") or ""
    if not module.startswith("seqmix.kernels.") or not module.endswith(".api"):
        raise ValueError(f"fn must be a public seqmix.kernels op, got {fn!r}")
    return importlib.import_module(module.rsplit(".", 1)[0] + ".tuning")


def config_class(fn: Callable, implementation: str) -> type:
    """The Config class that public op ``fn`` accepts for ``implementation``."""
    from seqmix.kernels import dispatch

    family_tuning(fn)  # validates fn
    op = dispatch.registered_ops().get(fn.__name__)
    if op is None or implementation not in op.configs:
        raise ValueError(
            f"{getattr(fn, '__name__', fn)} has no Config for implementation={implementation!r}"
        )
    return op.configs[implementation]


def _timed_fn(fn, args, kwargs, implementation, config, backward: bool):
    diff = [
        i
        for i, a in enumerate(args)
        if hasattr(a, "dtype") and jnp.issubdtype(a.dtype, jnp.floating)
    ]

    def forward(*xs):
        full = list(args)
        for i, x in zip(diff, xs):
            full[i] = x
        return fn(*full, implementation=implementation, config=config, **kwargs)

    if not backward:
        return jax.jit(forward), [args[i] for i in diff]

    def forward_backward(*xs):
        out, vjp = jax.vjp(forward, *xs)
        ct = jax.tree.map(
            lambda o: jnp.ones_like(o) if jnp.issubdtype(o.dtype, jnp.floating) else None, out
        )
        return vjp(ct)

    return jax.jit(forward_backward), [args[i] for i in diff]


def _short(e: BaseException) -> str:
    line = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return f"{type(e).__name__}: {line}"[:160]


def autotune(
    fn: Callable,
    args: Sequence,
    *,
    implementation: str,
    kwargs: Mapping | None = None,
    candidates: Sequence | None = None,
    axes: Sequence[Axis] | None = None,
    backward: bool = False,
    out: str | None = None,
    shape: str = "",
    reps: int = 5,
    log: Callable[[str], None] = print,
) -> Result:
    """Times public op ``fn(*args, implementation=..., config=c, **kwargs)`` over candidate
    Configs and returns the fastest (``Result``); with ``out``, merges it into that tuning
    file under (op, implementation, key), the key being the one the call resolves.

    ``candidates``: Configs timed one by one (forward+backward when ``backward``). Else
    ``axes`` (default: the family's ``tuning.SEARCH[(op, implementation)]``): a coordinate
    search from the empty Config. A candidate that fails (does not compile, not enough
    shared memory) is recorded and skipped.
    """
    kwargs = dict(kwargs or {})
    cls = config_class(fn, implementation)
    op = fn.__name__
    with recording() as seen:
        jax.eval_shape(lambda *a: fn(*a, implementation=implementation, **kwargs), *args)
    keys = sorted({k for o, i, k in seen if (o, i) == (op, implementation)})
    if len(keys) != 1:
        raise ValueError(f"{op} with implementation={implementation!r} resolved keys {keys}")
    key = keys[0]
    trials: list[Trial] = []

    def run(config, bwd: bool) -> float | None:
        timed, diff_args = _timed_fn(fn, args, kwargs, implementation, config, bwd)
        try:
            seconds = time_call(timed, *diff_args, reps=reps)
        except Exception as e:  # noqa: BLE001 - a candidate that fails is skipped
            trials.append(Trial(config, None, bwd, _short(e)))
            log(f"{op} {implementation} {key} {to_dict(config)}: {_short(e)}")
            return None
        trials.append(Trial(config, seconds, bwd))
        log(f"{op} {implementation} {key} {to_dict(config)}: {seconds * 1e3:.3f} ms")
        return seconds

    best, best_s = cls(), None
    if candidates is not None:
        for c in candidates:
            s = run(c, backward)
            if s is not None and (best_s is None or s < best_s):
                best, best_s = c, s
    else:
        if axes is None:
            axes = family_tuning(fn).SEARCH.get((op, implementation))
            if axes is None:
                raise ValueError(f"no search axes for ({op!r}, {implementation!r}); pass axes")
        for axis in axes:
            axis_best, axis_s = None, None
            for value in axis.values:
                c = dataclasses.replace(best, **{axis.field: value})
                s = run(c, axis.backward)
                if s is not None and (axis_s is None or s < axis_s):
                    axis_best, axis_s = c, s
            if axis_best is not None:
                best, best_s = axis_best, axis_s
                log(f"best {axis.field}: {getattr(best, axis.field)} ({axis_s * 1e3:.3f} ms)")
    result = Result(op, implementation, key, best, best_s, tuple(trials))
    if out and best_s is not None:
        write(out, result, shape=shape)
        log(f"wrote {out}")
    return result


def write(path: str, result: Result, *, shape: str = "") -> None:
    """Merges ``result.best`` into the tuning file at ``path`` (created if missing)."""
    data = {}
    if os.path.exists(path):
        with open(path) as f:
            data = json.load(f)
    entry = {"config": to_dict(result.best), "ms": None, "device": jax.devices()[0].device_kind}
    if result.seconds is not None:
        entry["ms"] = result.seconds * 1e3
    if shape:
        entry["shape"] = shape
    data.setdefault(result.op, {}).setdefault(result.implementation, {})[result.key] = entry
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
