"""Training: the loop, AdamW and schedules, orbax checkpoints, metrics and the device mesh.

``train_and_evaluate(config, workdir)`` trains and evaluates one experiment config (see
``seqmix.train.config`` for its keys), resuming from ``workdir/checkpoints``; it writes
``workdir/config.json``, ``workdir/metrics.jsonl`` and ``workdir/tensorboard/``.
``restore_model(workdir, step=None)`` returns ``(model, config)`` from a checkpoint.
"""

from seqmix.train.config import base_config, validate
from seqmix.train.loop import restore_model, train_and_evaluate
from seqmix.train.metrics import read_metrics

__all__ = ["base_config", "read_metrics", "restore_model", "train_and_evaluate", "validate"]
