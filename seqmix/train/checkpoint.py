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

A save that fails (a read-only or vanished directory, a full disk) raises
``CheckpointSaveError`` at once when it fails while starting (the step directory is created
before ``save`` returns), otherwise from the next ``check()`` after the background write
failed: the loop calls ``check()`` after every step, so training stops within a step of the
failure instead of running on without saving.
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


class CheckpointMismatchError(ValueError):
    """A checkpoint whose arrays do not fit the model it is restored into."""


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written; ``step`` is the step of the failed save."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


class _QuietNotes(logging.Filter):
    """Drops orbax warnings that describe intended behaviour, not problems: a save without
    metrics (steps without an evaluation are saved that way on purpose; they rank last for
    the best-checkpoint policy), a manager opened read-only to restore, and the per-item
    metadata file that the items' format does not write."""

    NOTES = (
        "did not provide metrics",
        "Given directory is read only",
        "read_only=True, setting save_interval_steps=0",
        "Metadata file does not exist",
    )

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(note in message for note in self.NOTES)


logging.getLogger("absl").addFilter(_QuietNotes())


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
            # the step directory is made before save() returns: an unwritable directory fails
            # there, at once, instead of in orbax's background threads (which then wait for
            # each other's signals for minutes and hold the process at exit)
            async_options=ocp.AsyncOptions(create_directories_asynchronously=False),
            cleanup_tmp_directories=not read_only,
            read_only=read_only,
            create=not read_only,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)
        self._pending: int | None = None  # the step of a save that may still be running
        self._failed = False

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, items: dict, metrics: dict | None = None) -> None:
        """Starts an asynchronous save of ``items`` (pytrees of arrays) at ``step`` (after
        the previous save finished; its failure is raised here). CheckpointSaveError when
        the save cannot start."""
        self.check(wait=True)
        if metrics is not None and self.metric is not None and self.metric not in metrics:
            metrics = None
        args = ocp.args.Composite(
            **{name: ocp.args.StandardSave(to_nested(tree)) for name, tree in items.items()}
        )
        try:
            self.manager.save(step, args=args, metrics=metrics, force=True)
        except Exception as e:
            raise self._failure(step, e) from e
        self._pending = step

    def check(self, *, wait: bool = False) -> None:
        """Raises CheckpointSaveError when the last save failed; without ``wait`` returns at
        once while it is still running."""
        if self._pending is None:
            return
        if not wait and self.manager.is_saving_in_progress():
            return
        step, self._pending = self._pending, None
        try:
            self.manager.wait_until_finished()
        except Exception as e:
            raise self._failure(step, e) from e
        if not os.path.isdir(os.path.join(self.directory, str(step))):
            raise self._failure(step, RuntimeError("no step directory after the save"))

    def _failure(self, step: int, cause: BaseException) -> CheckpointSaveError:
        self._failed = True
        done = [s for s in self.manager.all_steps() if s != step]
        resume = (
            f"it resumes from step {max(done)}, the newest complete checkpoint"
            if done
            else "it starts from scratch (no checkpoint was completed)"
        )
        return CheckpointSaveError(
            f"saving the checkpoint of step {step} in {self.directory} failed "
            f"({_first_line(cause)}). Training stopped, since it could not be saved. Make "
            f"the directory writable or free disk space, then run the same command again: "
            f"{resume}.",
            step,
        )

    def restore(self, step: int, targets: dict) -> dict:
        """The items of ``step``, restored into the structure, dtypes and shardings of
        ``targets`` (``{"params": abstract tree, ...}``; a subset of the items is fine)."""
        args = ocp.args.Composite(
            **{name: ocp.args.StandardRestore(to_nested(tree)) for name, tree in targets.items()}
        )
        restored = self.manager.restore(step, args=args)
        return {name: from_nested(restored[name], tree) for name, tree in targets.items()}

    def restore_part(self, step: int, item: str, target):
        """The subtree ``target`` (a pytree of abstract arrays with shardings, a part of
        what was saved, e.g. ``{"other": ...}`` of the ``train`` item) of one item of a
        checkpoint; the rest of the item is not read."""
        path = os.path.join(self.directory, str(step), item)
        nested = to_nested(target)
        if not jax.tree.leaves(nested):
            return target
        args = ocp.args.PyTreeRestore(
            item=nested,
            restore_args=ocp.checkpoint_utils.construct_restore_args(nested),
            partial_restore=True,
        )
        with ocp.PyTreeCheckpointer() as reader:
            restored = reader.restore(path, args=args)
        return from_nested(restored, target)

    def shapes(self, step: int, item: str = "params") -> dict[str, tuple]:
        """``{"a/b/c": shape}`` of the arrays of one item of a checkpoint, from its metadata
        (nothing is read into memory)."""
        path = os.path.join(self.directory, str(step), item)
        with ocp.StandardCheckpointer() as reader:
            meta = reader.metadata(path)
        tree = getattr(meta, "item_metadata", meta)
        tree = getattr(tree, "tree", tree)
        out = {}
        for key_path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            names = [_key_name(k) for k in key_path]
            if names and names[-1] == "value":
                names = names[:-1]
            out["/".join(names)] = tuple(getattr(leaf, "shape", ()))
        return out

    def mismatch(self, step: int, targets: dict, item: str = "params") -> str | None:
        """Why ``targets[item]`` cannot hold the checkpoint's arrays (missing, extra or
        differently shaped arrays, the first few named), or None when they fit."""
        try:
            saved = self.shapes(step, item)
        except Exception:  # noqa: BLE001 - unreadable metadata: the restore error says more
            return None
        if not saved:  # no metadata to compare (a damaged checkpoint): restoring will say
            return None
        wanted = {}
        for key_path, leaf in jax.tree_util.tree_flatten_with_path(to_nested(targets[item]))[0]:
            names = [_key_name(k) for k in key_path]
            if names and names[-1] == "value":
                names = names[:-1]
            wanted["/".join(names)] = tuple(getattr(leaf, "shape", ()))
        problems = []
        for key in sorted(set(saved) | set(wanted)):
            if key not in wanted:
                problems.append(f"{key} is in the checkpoint but not in the model")
            elif key not in saved:
                problems.append(f"{key} is in the model but not in the checkpoint")
            elif saved[key] != wanted[key]:
                problems.append(
                    f"{key} has shape {saved[key]} in the checkpoint, {wanted[key]} in the model"
                )
        if not problems:
            return None
        more = f" (and {len(problems) - 4} more)" if len(problems) > 4 else ""
        return "; ".join(problems[:4]) + more

    def restore_latest(
        self, targets: dict, *, step: int | None = None, set_aside_corrupt: bool = False
    ) -> tuple[int | None, dict | None]:
        """``(step, items)`` of the newest checkpoint that restores (or of ``step``);
        ``(None, None)`` when there is none. A checkpoint that fails to restore is skipped
        with a warning (and moved to ``<workdir>/corrupt_checkpoints/`` when
        ``set_aside_corrupt``, so that the resumed run can save that step again). A
        checkpoint whose arrays do not fit the targets (another model) is never set aside:
        CheckpointMismatchError names the arrays."""
        steps = self.all_steps()
        if step is not None:
            if step not in steps:
                raise ValueError(
                    f"step={step}: no checkpoint at that step in {self.directory} "
                    f"(available: {steps or 'none'})"
                )
            return step, self._restore_or_explain(step, targets)
        failed: list[tuple[int, str]] = []
        for candidate in reversed(steps):
            why = self.mismatch(candidate, targets)
            if why is not None:
                raise CheckpointMismatchError(
                    f"the checkpoint of step {candidate} in {self.directory} was written by "
                    f"another model than the one of the config: {why}"
                )
            try:
                items = self.restore(candidate, targets)
            except Exception as e:  # noqa: BLE001 - any failure means "unreadable checkpoint"
                logging.warning(
                    "checkpoint %s/%d could not be restored (%s); trying the previous one",
                    self.directory,
                    candidate,
                    _first_line(e),
                )
                failed.append((candidate, _first_line(e)))
                continue
            if set_aside_corrupt and failed:
                self._set_aside([s for s, _ in failed])
            return candidate, items
        if failed:
            reasons = "; ".join(f"step {s}: {why}" for s, why in failed)
            raise RuntimeError(
                f"none of the checkpoints in {self.directory} could be read ({reasons}). "
                "They are damaged; nothing was moved or deleted."
            )
        return None, None

    def _restore_or_explain(self, step: int, targets: dict) -> dict:
        why = self.mismatch(step, targets)
        if why is not None:
            raise CheckpointMismatchError(
                f"the checkpoint of step {step} in {self.directory} was written by another "
                f"model than the one of the config: {why}"
            )
        try:
            return self.restore(step, targets)
        except Exception as e:
            raise RuntimeError(
                f"the checkpoint of step {step} in {self.directory} could not be read "
                f"({_first_line(e)})"
            ) from e

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
        """Blocks until the last save is written; CheckpointSaveError if it failed."""
        self.check(wait=True)

    def close(self) -> None:
        """Waits for the last save and closes the manager. After a failed save nothing is
        waited for: orbax's threads of that save may never finish."""
        if self._failed:
            return
        try:
            self.check(wait=True)
        finally:
            if not self._failed:
                self.manager.close()
