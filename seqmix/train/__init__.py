"""Training: the loop, AdamW and schedules, orbax checkpoints, metrics and the device mesh.

``train_and_evaluate(config, workdir)`` trains and evaluates one experiment config (see
``seqmix.train.config`` for its keys), resuming from ``workdir/checkpoints``; it writes
``workdir/config.json`` (once), ``workdir/config_history.jsonl`` (a line per start),
``workdir/metrics.jsonl`` and ``workdir/tensorboard/``. ``restore_model(workdir, step=None)``
returns ``(model, config)`` from a checkpoint.

The loop's pieces are public for sweeps and benchmarks that drive them differently:
``build_program(config)`` (the model split, optimizer, shardings and jitted ``train_step``/
``eval_step``), ``init_state(program, on_host=True)``, ``make_train_step``/
``make_eval_step`` (the pure step functions) and ``seqmix.train.callbacks`` (hooks that see
every step's and evaluation's metrics and may stop the run: ``StopAtMetric``,
``Deadline``, ``StopWhenSet``).
"""

from seqmix.train import callbacks
from seqmix.train.callbacks import Callback, Deadline, StopAtMetric, StopWhenSet
from seqmix.train.checkpoint import CheckpointMismatchError, CheckpointSaveError
from seqmix.train.config import base_config, validate
from seqmix.train.loop import NonFiniteError, train_and_evaluate
from seqmix.train.metrics import read_metrics
from seqmix.train.restore import restore_model
from seqmix.train.steps import (
    ModelParts,
    Program,
    TrainState,
    apply_model,
    build_program,
    init_rngs,
    init_state,
    make_eval_step,
    make_train_step,
    model_config_of,
    params_by_layer,
    split_model,
)
from seqmix.train.workdir import ConfigMismatchError, load_config

__all__ = [
    "Callback",
    "CheckpointMismatchError",
    "CheckpointSaveError",
    "ConfigMismatchError",
    "Deadline",
    "ModelParts",
    "NonFiniteError",
    "Program",
    "StopAtMetric",
    "StopWhenSet",
    "TrainState",
    "apply_model",
    "base_config",
    "build_program",
    "callbacks",
    "init_rngs",
    "init_state",
    "load_config",
    "make_eval_step",
    "make_train_step",
    "model_config_of",
    "params_by_layer",
    "read_metrics",
    "restore_model",
    "split_model",
    "train_and_evaluate",
    "validate",
]
