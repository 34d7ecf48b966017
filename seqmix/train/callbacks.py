"""Hooks into the training loop that watch its metrics and may ask it to stop.

``train_and_evaluate(config, workdir, callbacks=[...])`` calls, on the host:

- ``on_train(step, metrics)`` with each step's scalars (``loss``, ``accuracy``,
  ``grad_norm``, ``lr``), in step order;
- ``on_eval(step, metrics)`` with each evaluation's means (``loss``, ``accuracy``, and
  ``bits_per_byte`` for byte-level tasks).

A hook that returns a non-empty string asks the loop to stop; the string is the reason.
The loop then finishes the step in flight, evaluates (unless it just did), saves a
checkpoint, and returns with ``result["stopped_by"]`` set to the reason (a run stopped so
resumes like any other). A plain function ``fn(step, metrics)`` is an ``on_train`` hook.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable


class Callback:
    """Base class: override ``on_train`` and/or ``on_eval``; return a reason to stop."""

    def on_train(self, step: int, metrics: dict) -> str | None:
        del step, metrics
        return None

    def on_eval(self, step: int, metrics: dict) -> str | None:
        del step, metrics
        return None


class _OnTrain(Callback):
    def __init__(self, fn: Callable[[int, dict], object]):
        self.fn = fn

    def on_train(self, step: int, metrics: dict) -> str | None:
        out = self.fn(step, metrics)
        return out if isinstance(out, str) and out else None


def as_callback(hook) -> Callback:
    """``hook`` itself when it is a ``Callback``, else ``fn(step, train metrics)`` wrapped as
    an ``on_train`` hook."""
    if isinstance(hook, Callback):
        return hook
    if not callable(hook):
        raise TypeError(f"callbacks must be Callback objects or functions, got {hook!r}")
    return _OnTrain(hook)


class StopAtMetric(Callback):
    """Stops at the first evaluation whose ``metric`` reaches ``threshold`` (``>=`` for
    ``mode="max"``, ``<=`` for ``"min"``); the reason is ``"<metric> reached <threshold>"``."""

    def __init__(self, metric: str, threshold: float, *, mode: str = "max"):
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
        if not math.isfinite(float(threshold)):
            raise ValueError(f"threshold must be a finite number, got {threshold!r}")
        self.metric, self.threshold, self.mode = metric, float(threshold), mode

    def on_eval(self, step: int, metrics: dict) -> str | None:
        del step
        value = metrics.get(self.metric)
        if value is None:
            return None
        hit = value >= self.threshold if self.mode == "max" else value <= self.threshold
        return f"{self.metric} reached {self.threshold:g}" if hit else None


class Deadline(Callback):
    """Stops at the first step after the wall-clock time ``at`` (a ``time.time()`` value);
    the reason is ``"deadline"``."""

    REASON = "deadline"

    def __init__(self, at: float):
        self.at = float(at)

    def on_train(self, step: int, metrics: dict) -> str | None:
        del step, metrics
        return self.REASON if time.time() > self.at else None


class StopWhenSet(Callback):
    """Stops at the first step after ``event`` (a ``threading.Event``) is set; the reason is
    ``reason`` (default ``"interrupted"``). Another thread stops a run this way."""

    def __init__(self, event: threading.Event, reason: str = "interrupted"):
        self.event, self.reason = event, reason

    def on_train(self, step: int, metrics: dict) -> str | None:
        del step, metrics
        return self.reason if self.event.is_set() else None
