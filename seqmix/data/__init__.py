"""Tasks as pure functions of ``(seed, step)``: MQAR, selective copying, ListOps, stdlib bytes.

``make_task(config)`` reads ``config.data.task`` (one of ``TASKS``), ``config.seed``,
``config.train.batch_size`` and ``config.train.eval_batch_size`` (default: the batch size).
"""

from __future__ import annotations

from seqmix.data import bytes as bytes_lm
from seqmix.data import copying, listops, mqar
from seqmix.data.task import EVAL_STREAM, TRAIN_STREAM, Batch, Task, rng_for

TASKS = {
    "mqar": mqar.task,
    "copying": copying.task,
    "listops": listops.task,
    "bytes": bytes_lm.task,
}


def make_task(config) -> Task:
    """The ``Task`` of a full experiment config; ValueError naming the key on bad values."""
    name = config.data.get("task", None)
    if name not in TASKS:
        raise ValueError(f"data.task must be one of {sorted(TASKS)}, got {name!r}")
    batch_size = config.train.batch_size
    eval_batch_size = config.train.get("eval_batch_size", None) or batch_size
    return TASKS[name](
        config.data, seed=config.seed, batch_size=batch_size, eval_batch_size=eval_batch_size
    )


__all__ = [
    "EVAL_STREAM",
    "TASKS",
    "TRAIN_STREAM",
    "Batch",
    "Task",
    "bytes_lm",
    "copying",
    "listops",
    "make_task",
    "mqar",
    "rng_for",
]
