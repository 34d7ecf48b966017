"""The task interface the trainer sees, and the one source of randomness for data.

A task turns ``(seed, step)`` into a batch: no iterator state, so a resumed run draws exactly
the batches an uninterrupted one would have drawn. Evaluation sets come from a separate
stream of the same seed and are therefore fixed.

Batches are dicts of numpy arrays:

- language-model tasks (``kind="causal_lm"``): ``inputs`` int32 ``[B, T]``, ``targets`` int32
  ``[B, T]`` (the token that the logits at position ``t`` must predict) and ``mask`` float32
  ``[B, T]`` (1 where the position counts for loss and accuracy, 0 elsewhere);
- classification tasks (``kind="classifier"``): ``inputs`` int32 ``[B, T]`` (0 is padding),
  ``segment_ids`` int32 ``[B, T]`` (1 on tokens, 0 on padding), ``targets`` int32 ``[B]``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import numpy as np

from seqmix import checks

Batch = dict[str, np.ndarray]

TRAIN_STREAM = 0
EVAL_STREAM = 1


def rng_for(seed: int, stream: int, index: int) -> np.random.Generator:
    """A numpy generator that depends only on ``(seed, stream, index)`` (never on call order)."""
    if seed < 0 or index < 0:
        raise ValueError(f"seed and step must be >= 0, got seed={seed}, step={index}")
    return np.random.default_rng([int(seed), int(stream), int(index)])


def batches_of(
    generate: Callable[..., Batch], seed: int, **kwargs
) -> Callable[[int, int, int], Batch]:
    """A task's ``batch(stream, index, batch_size)`` from a generator
    ``generate(seed, stream, index, batch_size, **kwargs)`` (picklable: a partial of
    module-level functions)."""
    return functools.partial(_call, generate, seed, kwargs)


def _call(generate, seed, kwargs, stream, index, batch_size):
    return generate(seed, stream, index, batch_size, **kwargs)


@dataclasses.dataclass(frozen=True)
class Task:
    """A data source for the trainer.

    ``batch(stream, index, batch_size)`` is pure; ``train_batch(step)`` and
    ``eval_batches()`` are the two ways the loop calls it. ``metric`` names the evaluation
    number that ranks checkpoints (``metric_mode`` "max" or "min").
    """

    name: str
    kind: str  # "causal_lm" or "classifier": the model kind the task trains
    vocab_size: int
    seq_len: int
    batch: Callable[[int, int, int], Batch]  # (stream, index, batch_size) -> Batch
    batch_size: int
    eval_batch_size: int
    num_eval_batches: int
    metric: str = "accuracy"
    metric_mode: str = "max"
    num_classes: int | None = None
    bits_per_byte: bool = False  # report loss / ln 2 as bits per byte (byte-level LM)

    def train_batch(self, step: int) -> Batch:
        return self.check_batch(self.batch(TRAIN_STREAM, step, self.batch_size))

    def eval_batches(self) -> list[Batch]:
        return [
            self.check_batch(self.batch(EVAL_STREAM, i, self.eval_batch_size))
            for i in range(self.num_eval_batches)
        ]

    def check_batch(self, batch: Batch) -> Batch:
        """``batch`` after checking its ids on the host (a min and max per array, before
        the batch reaches a jitted step, where an id outside the vocabulary would silently
        read a NaN embedding row): ``inputs`` in ``[0, vocab_size)``; the ``targets`` that
        count (``mask`` > 0) in ``[0, vocab_size)`` for language models, every target in
        ``[0, num_classes)`` for classifiers. ValueError naming the array otherwise (the task's generator is wrong)."""
        checks.id_range(batch["inputs"], self.vocab_size, "inputs")
        targets = batch.get("targets")
        if targets is None:
            return batch
        if self.kind == "classifier":
            if self.num_classes is not None:
                checks.id_range(targets, self.num_classes, "targets", "the classes")
        else:
            mask = batch.get("mask")
            counted = targets if mask is None else np.where(np.asarray(mask) > 0, targets, 0)
            checks.id_range(counted, self.vocab_size, "targets")
        return batch

    @property
    def tokens_per_batch(self) -> int:
        return self.batch_size * self.seq_len


def check_positive(value, key: str, *, allow_zero: bool = False) -> int:
    """``value`` as an int, or ValueError naming ``key``."""
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        want = ">= 0" if allow_zero else ">= 1"
        raise ValueError(f"{key} must be an integer {want}, got {value!r}")
    return int(value)
