"""Byte-level language modelling on the source of Python's standard library.

Every Python ships the corpus: the ``.py`` files under ``sysconfig.get_paths()["stdlib"]``
(third-party ``site-packages``/``dist-packages`` excluded), taken in sorted order of their
relative paths. A file goes to validation when the first 8 bytes of the SHA-256 of its
relative path, as an integer modulo 1000, are below ``1000 * val_fraction``; otherwise to
training. Each split is the concatenation of its files (each followed by a NUL byte) as one
``uint8`` file, written once under ``data_dir/stdlib-py<major>.<minor>/`` (atomically: a
temporary file then a rename) and read through ``np.memmap``.

A batch holds ``batch_size`` windows of ``seq_len + 1`` bytes starting at offsets drawn from
the generator of ``(seed, stream, step)``: ``inputs`` are the first ``seq_len`` bytes,
``targets`` the next-byte shifts, ``mask`` all ones. Validation windows come from the
validation file. The evaluation reports bits per byte, the mean cross-entropy in nats over
``ln 2`` (one token is one byte).

One token is one byte: ``encode(text)`` gives the int32 tokens of a string's UTF-8 bytes,
``decode(tokens)`` the text of a token sequence (a sequence of byte values; a negative value,
the padding ``generate`` puts after a stop token, ends it).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import pathlib
import sys
import sysconfig
import tempfile

import numpy as np

from seqmix.data.task import EVAL_STREAM, Batch, Task, batches_of, check_positive, rng_for

VOCAB_SIZE = 256
EXCLUDED_DIRS = ("site-packages", "dist-packages")


def encode(text: str) -> np.ndarray:
    """The tokens of ``text``: its UTF-8 bytes as int32 ``[len(bytes)]``."""
    if not isinstance(text, str):
        raise ValueError(f"text must be a str, got {type(text).__name__}")
    return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)


def decode(tokens, *, errors: str = "replace") -> str:
    """The text of ``tokens`` (a 1-D sequence of byte values 0..255), read as UTF-8; it ends
    at the first negative value (padding). Bytes that are not valid UTF-8 become U+FFFD
    (``errors="replace"``; any ``bytes.decode`` policy is accepted). ValueError for a
    value above 255 or an array that is not 1-D."""
    values = np.asarray(tokens)
    if values.ndim != 1:
        raise ValueError(
            f"tokens must be one sequence (1-D), got shape {values.shape}; decode rows one by one"
        )
    if values.size and not np.issubdtype(values.dtype, np.integer):
        raise ValueError(f"tokens must be integers, got dtype {values.dtype}")
    stop = np.flatnonzero(values < 0)
    if stop.size:
        values = values[: stop[0]]
    if values.size and values.max() > 255:
        i = int(np.argmax(values > 255))
        raise ValueError(f"tokens must be bytes (0..255), got tokens[{i}] = {int(values[i])}")
    return values.astype(np.uint8).tobytes().decode("utf-8", errors=errors)


def default_data_dir() -> str:
    return os.environ.get("SEQMIX_DATA_DIR", os.path.join("~", ".cache", "seqmix"))


def source_files(root: str | None = None) -> list[pathlib.Path]:
    """The sorted ``.py`` files of the standard library (paths relative to ``root``)."""
    root_path = pathlib.Path(root or sysconfig.get_paths()["stdlib"])
    files = []
    for path in root_path.rglob("*.py"):
        rel = path.relative_to(root_path)
        if any(part in EXCLUDED_DIRS or part == "__pycache__" for part in rel.parts):
            continue
        if path.is_file():
            files.append(rel)
    return sorted(files, key=lambda p: p.as_posix())


def is_validation(rel_path: pathlib.Path, val_fraction: float) -> bool:
    digest = hashlib.sha256(rel_path.as_posix().encode()).digest()
    return int.from_bytes(digest[:8], "big") % 1000 < round(1000 * val_fraction)


def corpus_dir(data_dir: str, val_fraction: float) -> pathlib.Path:
    name = f"stdlib-py{sys.version_info.major}.{sys.version_info.minor}-val{val_fraction:g}"
    return pathlib.Path(os.path.expanduser(data_dir)) / name


def build(data_dir: str, *, val_fraction: float = 0.05, root: str | None = None) -> dict:
    """Writes ``train.bin``/``val.bin``/``meta.json`` once; returns the metadata."""
    out = corpus_dir(data_dir, val_fraction)
    meta_path = out / "meta.json"
    if meta_path.exists():
        return json.loads(meta_path.read_text())
    out.mkdir(parents=True, exist_ok=True)
    root_path = pathlib.Path(root or sysconfig.get_paths()["stdlib"])
    parts: dict[str, list[bytes]] = {"train": [], "val": []}
    counts = {"train": 0, "val": 0}
    for rel in source_files(str(root_path)):
        split = "val" if is_validation(rel, val_fraction) else "train"
        parts[split].append((root_path / rel).read_bytes() + b"\0")
        counts[split] += 1
    meta = {"root": str(root_path), "val_fraction": val_fraction, "python": sys.version}
    for split, chunks in parts.items():
        data = b"".join(chunks)
        _atomic_write(out / f"{split}.bin", data)
        meta[f"{split}_bytes"] = len(data)
        meta[f"{split}_files"] = counts[split]
    # meta.json last: its presence marks a complete cache.
    _atomic_write(meta_path, json.dumps(meta, indent=1).encode())
    return meta


def _atomic_write(path: pathlib.Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@functools.lru_cache(maxsize=8)
def open_split(data_dir: str, split: str, val_fraction: float = 0.05) -> np.memmap:
    """The ``uint8`` memmap of one split (``"train"`` or ``"val"``), built on first use."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    build(data_dir, val_fraction=val_fraction)
    return np.memmap(corpus_dir(data_dir, val_fraction) / f"{split}.bin", np.uint8, mode="r")


def windows(data: np.ndarray, rng: np.random.Generator, batch_size: int, seq_len: int) -> Batch:
    """``batch_size`` random windows of ``data``: next-byte ``inputs``/``targets``."""
    if len(data) < seq_len + 2:
        raise ValueError(f"data.seq_len={seq_len} is longer than the corpus ({len(data)} bytes)")
    starts = rng.integers(0, len(data) - seq_len - 1, size=batch_size)
    rows = np.stack([np.asarray(data[s : s + seq_len + 1]) for s in starts]).astype(np.int32)
    return {
        "inputs": rows[:, :-1],
        "targets": rows[:, 1:],
        "mask": np.ones((batch_size, seq_len), np.float32),
    }


def batch(
    seed: int,
    stream: int,
    index: int,
    batch_size: int,
    *,
    seq_len: int,
    data_dir: str,
    val_fraction: float = 0.05,
) -> Batch:
    """The batch of ``(seed, stream, index)``: training windows for the train stream,
    validation windows for the evaluation stream."""
    split = "val" if stream == EVAL_STREAM else "train"
    data = open_split(os.path.expanduser(data_dir), split, val_fraction)
    return windows(data, rng_for(seed, stream, index), batch_size, seq_len)


def task(data, *, seed: int, batch_size: int, eval_batch_size: int) -> Task:
    """The byte-LM task of a ``config.data`` (keys seq_len, data_dir, val_fraction,
    num_eval_batches)."""
    seq_len = check_positive(data.seq_len, "data.seq_len")
    val_fraction = float(data.get("val_fraction", 0.05))
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
    data_dir = data.get("data_dir", None) or default_data_dir()
    kwargs = dict(seq_len=seq_len, data_dir=data_dir, val_fraction=val_fraction)
    return Task(
        name="bytes",
        kind="causal_lm",
        vocab_size=VOCAB_SIZE,
        seq_len=seq_len,
        batch=batches_of(batch, seed, **kwargs),
        batch_size=batch_size,
        eval_batch_size=eval_batch_size,
        num_eval_batches=check_positive(data.num_eval_batches, "data.num_eval_batches"),
        metric="bits_per_byte",
        metric_mode="min",
        bits_per_byte=True,
    )
