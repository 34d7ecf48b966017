"""Where numbers go: ``workdir/metrics.jsonl``, TensorBoard event files, a terminal progress bar.

``metrics.jsonl`` has one JSON object per line, ``{"step": s, "split": "train"|"eval", "time":
unix seconds, <name>: value, ...}``, appended across restarts (a resumed run repeats the steps
after its checkpoint; the later line wins). A last line cut short by a crash is cut off when
the file is opened again for writing, and skipped with a warning by ``read_metrics``. TensorBoard scalars ``<split>/<name>`` go to
``workdir/tensorboard/`` through tensorboard's own event writer (no TensorFlow needed):
``tensorboard --logdir <workdir>/tensorboard``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time

from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.event_file_writer import EventFileWriter


def _plain(value):
    value = float(value)
    return value if math.isfinite(value) else str(value)


def cut_partial_line(path: str) -> int:
    """Removes a last line without its newline (what a crash during a write leaves) from
    the file at ``path``; returns the number of bytes removed (0: the file was whole)."""
    if not os.path.exists(path):
        return 0
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return 0
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return 0
        # find the last newline; everything after it is the partial line
        block, end = 4096, size
        keep = 0
        while end > 0:
            start = max(0, end - block)
            f.seek(start)
            chunk = f.read(end - start)
            i = chunk.rfind(b"\n")
            if i >= 0:
                keep = start + i + 1
                break
            end = start
        f.truncate(keep)
        return size - keep


class MetricsWriter:
    """Writes scalars to ``metrics.jsonl`` and TensorBoard (``tensorboard=False``: JSON only).
    A partial last line left by a crash is cut off (with a warning) before appending."""

    def __init__(self, workdir: str, *, tensorboard: bool = True):
        os.makedirs(workdir, exist_ok=True)
        self.path = os.path.join(workdir, "metrics.jsonl")
        removed = cut_partial_line(self.path)
        if removed:
            logging.warning(
                "%s ended in a partial line (%d bytes, cut short by a crash); removed it",
                self.path,
                removed,
            )
        self._file = open(self.path, "a", buffering=1)  # noqa: SIM115 (closed by close(); line-buffered: a crash loses no line)
        self._tb = EventFileWriter(os.path.join(workdir, "tensorboard")) if tensorboard else None

    def write(self, step: int, split: str, scalars: dict) -> None:
        record = {"step": int(step), "split": split, "time": round(time.time(), 3)}
        record.update({k: _plain(v) for k, v in scalars.items()})
        self._file.write(json.dumps(record) + "\n")
        if self._tb is not None:
            values = [
                summary_pb2.Summary.Value(tag=f"{split}/{k}", simple_value=float(v))
                for k, v in scalars.items()
            ]
            self._tb.add_event(
                event_pb2.Event(
                    wall_time=time.time(), step=int(step), summary=summary_pb2.Summary(value=values)
                )
            )

    def flush(self) -> None:
        self._file.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(workdir: str, split: str | None = None) -> list[dict]:
    """The records of ``workdir/metrics.jsonl`` (of one split), later duplicates of a step
    replacing earlier ones, in step order. A line that is not a whole record (the partial
    last line of a crashed run) is skipped with a warning."""
    by_key: dict = {}
    path = os.path.join(os.path.expanduser(workdir), "metrics.jsonl")
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                key = (record["split"], record["step"])
            except (json.JSONDecodeError, KeyError, TypeError):
                logging.warning(
                    "%s:%d is not a whole metrics record (%r); skipped", path, number, line[:80]
                )
                continue
            if split is None or record["split"] == split:
                by_key[key] = record
    return [by_key[k] for k in sorted(by_key, key=lambda k: (k[1], k[0]))]


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class ProgressBar:
    """``step/total [####....] loss 1.234 acc 0.50 12.3k tok/s 8.1 ms/step 01:02<03:04`` on a
    terminal (redrawn in place), or the same text as a log line every ``every`` steps otherwise;
    ``label`` starts every line (several runs sharing one terminal)."""

    def __init__(
        self,
        total: int,
        start: int = 0,
        *,
        stream=None,
        every: int = 100,
        width: int = 24,
        label: str = "",
    ):
        self.total, self.start = total, start
        self.label = f"{label} " if label else ""
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.every, self.width = every, width
        self.t0 = time.time()
        self._last_draw = 0.0

    def update(
        self,
        step: int,
        scalars: dict,
        tokens_per_second: float | None = None,
        ms_per_step: float | None = None,
    ) -> None:
        now = time.time()
        done = step >= self.total
        if self.tty:
            if now - self._last_draw < 0.1 and not done:
                return
        elif step % self.every and not done:
            return
        self._last_draw = now
        frac = step / max(self.total, 1)
        filled = int(self.width * frac)
        bar = "#" * filled + "." * (self.width - filled)
        rate = (step - self.start) / max(now - self.t0, 1e-9)
        eta = (self.total - step) / rate if rate > 0 else 0.0
        parts = [f"{self.label}{step}/{self.total} [{bar}]"]
        parts += [f"{k} {v:.4g}" for k, v in scalars.items()]
        if tokens_per_second is not None:
            parts.append(f"{tokens_per_second / 1e3:.1f}k tok/s")
        if ms_per_step is not None:
            parts.append(f"{ms_per_step:.1f} ms/step")
        parts.append(f"{_duration(now - self.t0)}<{_duration(eta)}")
        text = " ".join(parts)
        if self.tty:
            self.stream.write("\r\033[K" + text + ("\n" if done else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def write(self, text: str) -> None:
        """A line printed above the bar."""
        if self.tty:
            self.stream.write("\r\033[K")
        self.stream.write(self.label + text + "\n")
        self.stream.flush()
