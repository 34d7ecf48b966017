"""Checkpoints in ``workdir/checkpoints/<step>/`` through an orbax ``CheckpointManager``.

A step directory holds two items: ``params`` (the model parameters, alone, so that
``restore_model`` reads nothing else) and ``train`` (optimizer state and any other model state).
Each item is a nested dict of arrays keyed by the path of the leaf in the training pytree, so a
checkpoint is restored into any pytree with the same paths and shapes, under any sharding:
restoring onto a different mesh is restoring into targets that carry the new shardings.

Saves are asynchronous: ``save`` returns once the arrays are copied off the devices and orbax
writes them in a background thread into ``<step>.orbax-checkpoint-tmp-*`` and renames the
directory to ``<step>`` when every file is written, so a half-written checkpoint never has a
step name and is never "latest" (stale temporary directories are removed at start). Kept: the
last ``keep`` steps plus the best by the evaluation metric (``BestN``; only checkpoints saved
with evaluation metrics compete).
"""

from __future__ import annotations

import logging
import os
import shutil
import time

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocm

ITEMS = ("params", "train")


class _NoMetricsNote(logging.Filter):
    """Drops orbax's warning for a save without metrics: steps without an evaluation are
    saved that way on purpose (they rank last for the best-checkpoint policy)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "did not provide metrics" not in record.getMessage()


logging.getLogger("absl").addFilter(_NoMetricsNote())


def _key_name(key) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def to_nested(tree) -> dict:
    """A nested dict ``{path component: ... leaf}`` of a pytree's leaves."""
    out: dict = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        names = [_key_name(k) for k in path] or ["value"]
        node = out
        for name in names[:-1]:
            node = node.setdefault(name, {})
        if names[-1] in node:
            raise ValueError(f"two leaves share the checkpoint path {'/'.join(names)}")
        node[names[-1]] = leaf
    return out


def from_nested(nested: dict, like):
    """The pytree with the structure of ``like`` whose leaves are read from ``nested``."""
    paths, treedef = jax.tree_util.tree_flatten_with_path(like)
    leaves = []
    for path, _ in paths:
        node = nested
        for name in [_key_name(k) for k in path] or ["value"]:
            node = node[name]
        leaves.append(node)
    return jax.tree_util.tree_unflatten(treedef, leaves)


class Checkpoints:
    """Saves and restores ``{"params": ..., "train": ...}`` pytrees under ``directory``."""

    def __init__(
        self,
        directory: str,
        *,
        keep: int = 3,
        metric: str | None = None,
        metric_mode: str = "max",
        async_save: bool = True,
        read_only: bool = False,
    ):
        self.directory = os.path.abspath(directory)
        self.metric = metric
        policies = [ocm.LatestN(n=keep)]
        best_fn = None
        if metric is not None:
            # A checkpoint saved without evaluation (no metrics) ranks last.
            worst = float("inf") if metric_mode == "min" else float("-inf")
            best_fn = lambda m: float((m or {}).get(metric, worst))
            policies.append(
                ocm.BestN(
                    get_metric_fn=best_fn,
                    reverse=metric_mode == "min",
                    n=1,
                    keep_checkpoints_without_metrics=False,
                )
            )
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocm.AnyPreservationPolicy(policies),
            # best_fn also makes orbax write each step's metrics to disk (<step>/metrics):
            # without it BestN ranks by metrics held in memory only, and a resumed run
            # deletes the best checkpoint of the runs before it.
            best_fn=best_fn,
            best_mode=metric_mode,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=not read_only,
            read_only=read_only,
            create=not read_only,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, items: dict, metrics: dict | None = None) -> None:
        """Starts an asynchronous save of ``items`` (pytrees of arrays) at ``step``."""
        if metrics is not None and self.metric is not None and self.metric not in metrics:
            metrics = None
        args = ocp.args.Composite(
            **{name: ocp.args.StandardSave(to_nested(tree)) for name, tree in items.items()}
        )
        self.manager.save(step, args=args, metrics=metrics, force=True)

    def restore(self, step: int, targets: dict) -> dict:
        """The items of ``step``, restored into the structure, dtypes and shardings of
        ``targets`` (``{"params": abstract tree, ...}``; a subset of the items is fine)."""
        args = ocp.args.Composite(
            **{name: ocp.args.StandardRestore(to_nested(tree)) for name, tree in targets.items()}
        )
        restored = self.manager.restore(step, args=args)
        return {name: from_nested(restored[name], tree) for name, tree in targets.items()}

    def restore_latest(
        self, targets: dict, *, step: int | None = None, set_aside_corrupt: bool = False
    ) -> tuple[int | None, dict | None]:
        """``(step, items)`` of the newest checkpoint that restores (or of ``step``);
        ``(None, None)`` when there is none. A checkpoint that fails to restore is skipped
        with a warning (and moved to ``<workdir>/corrupt_checkpoints/`` when
        ``set_aside_corrupt``, so that the resumed run can save that step again)."""
        steps = self.all_steps()
        if step is not None:
            if step not in steps:
                raise ValueError(
                    f"step={step}: no checkpoint at that step in {self.directory} "
                    f"(available: {steps})"
                )
            return step, self.restore(step, targets)
        failed = []
        for candidate in reversed(steps):
            try:
                items = self.restore(candidate, targets)
            except Exception as e:  # noqa: BLE001 - any failure means "unreadable checkpoint"
                logging.warning(
                    "checkpoint %s/%d could not be restored (%s: %s); trying the previous one",
                    self.directory,
                    candidate,
                    type(e).__name__,
                    str(e).splitlines()[0] if str(e) else "",
                )
                failed.append(candidate)
                continue
            if set_aside_corrupt and failed:
                self._set_aside(failed)
            return candidate, items
        if failed:
            raise RuntimeError(
                f"no checkpoint in {self.directory} could be restored (tried steps {failed}); "
                "move the directory away to start from scratch"
            )
        return None, None

    def _set_aside(self, steps: list[int]) -> None:
        dest_root = os.path.join(os.path.dirname(self.directory), "corrupt_checkpoints")
        os.makedirs(dest_root, exist_ok=True)
        for step in steps:
            src = os.path.join(self.directory, str(step))
            dest = os.path.join(dest_root, f"{step}-{int(time.time())}")
            logging.warning("moving unreadable checkpoint %s to %s", src, dest)
            shutil.move(src, dest)
        self.manager.reload()

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
