"""A run directory's record of its configs: what was trained there, from which step, how.

Files in a workdir (besides ``checkpoints/``, ``metrics.jsonl`` and ``tensorboard/``):

- ``config.json``: the config the run started with. Written once, never overwritten.
- ``config_history.jsonl``: one line per start of training in the workdir, appended:
  ``{"time", "event", "step", "segment_start", "changes", ["config"], ["previous"]}`` with
  ``event`` one of ``"new"`` (the first start), ``"resume"``, ``"fine_tune"``, ``"fresh"``;
  ``step`` the step training started from; ``segment_start`` the step the current schedule
  started from (0, or the step a fine-tune started from); ``changes`` ``{key: [old, new]}``
  against the config in force before; ``config`` the full config whenever it changed.
- ``previous/<k>/``: earlier runs of the workdir, whole (config, history, checkpoints,
  metrics, TensorBoard events), moved there by a fresh start.

The config in force (``load_config``) is the last ``config`` of the history, else
``config.json``.

A run's identity is its ``seed``, ``model`` (the mixers it uses), ``data``, ``optimizer``,
``distill`` (a distillation run's teacher and stages)
and ``train.batch_size``/``train.compute_dtype``: a start whose identity differs from the
workdir's is refused (``ConfigMismatchError``, naming every differing key, before anything
is written) unless ``on_config_change`` says what to do instead:

- ``"fine_tune"``: a new training segment from the newest checkpoint's parameters (same
  model shapes), a fresh optimizer state and schedule, ``train.num_steps`` more steps
  numbered after that checkpoint's step;
- ``"fresh"``: the workdir's run moves to ``previous/<k>/`` and training starts at step 0.

Other keys (``train.num_steps``, evaluation and checkpoint cadence, the mesh) may change
on a resume; the change is appended to the history.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import shutil

import ml_collections

CONFIG_FILE = "config.json"
HISTORY_FILE = "config_history.jsonl"
PREVIOUS_DIR = "previous"
RUN_ENTRIES = (
    CONFIG_FILE,
    HISTORY_FILE,
    "checkpoints",
    "corrupt_checkpoints",
    "metrics.jsonl",
    "tensorboard",
)
IDENTITY_SECTIONS = ("seed", "model", "data", "optimizer", "distill")
IDENTITY_TRAIN_KEYS = ("train.batch_size", "train.compute_dtype")
POLICIES = ("refuse", "fine_tune", "fresh")
_ABSENT = "<absent>"


class ConfigMismatchError(ValueError):
    """A start whose config differs from the run recorded in the workdir.
    ``differences``: ``{key: (recorded, given)}``."""

    def __init__(self, message: str, differences: dict):
        super().__init__(message)
        self.differences = differences


def _plain(config) -> dict:
    """A JSON-compatible dict of a ConfigDict (tuples as lists, references resolved)."""
    if isinstance(config, ml_collections.ConfigDict):
        return json.loads(config.to_json_best_effort(sort_keys=True))
    return json.loads(json.dumps(config, default=str))


def flatten(tree: dict, prefix: str = "") -> dict:
    """``{"a.b.c": leaf}`` of a nested dict (an empty dict is a leaf)."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def identity(config) -> dict:
    """The flattened keys that define what a run trains (see the module docstring): the
    layers as mixer names, the legend left out, only the used mixers' keys."""
    from seqmix.models.config import layer_names  # local: the registry imports the layers

    tree = _plain(config)
    view = {k: tree.get(k, _ABSENT) for k in IDENTITY_SECTIONS}
    model = dict(view["model"]) if isinstance(view["model"], dict) else {}
    if model:
        try:
            names = list(layer_names(ml_collections.ConfigDict(model, type_safe=False)))
        except (ValueError, KeyError, AttributeError, TypeError):
            names = model.get("layers")
        model["layers"] = names
        model.pop("legend", None)
        used = set(names) if isinstance(names, list) else set()
        model["mixers"] = {k: v for k, v in (model.get("mixers") or {}).items() if k in used}
        view["model"] = model
    flat = flatten(view)
    train = tree.get("train", {}) or {}
    for key in IDENTITY_TRAIN_KEYS:
        flat[key] = train.get(key.split(".", 1)[1], _ABSENT)
    return flat


def differences(old, new, *, only_identity: bool = True) -> dict:
    """``{key: (old value, new value)}`` of the keys that differ (identity keys only, or
    every key)."""
    a = identity(old) if only_identity else flatten(_plain(old))
    b = identity(new) if only_identity else flatten(_plain(new))
    return {
        k: (a.get(k, _ABSENT), b.get(k, _ABSENT))
        for k in sorted(set(a) | set(b))
        if a.get(k, _ABSENT) != b.get(k, _ABSENT)
    }


def describe(diffs: dict, limit: int = 12) -> str:
    items = [f"{k} ({old!r} -> {new!r})" for k, (old, new) in diffs.items()]
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def read_history(workdir: str) -> list[dict]:
    path = os.path.join(workdir, HISTORY_FILE)
    if not os.path.exists(path):
        return []
    entries = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    entries.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a line cut by a crash: the starts before it still count
    return entries


def has_run(workdir: str) -> bool:
    return os.path.exists(os.path.join(workdir, CONFIG_FILE))


def load_config(workdir: str) -> ml_collections.ConfigDict:
    """The config in force in ``workdir``: the newest one of its history, else
    ``config.json``. FileNotFoundError when the directory holds no run."""
    workdir = os.path.abspath(os.path.expanduser(workdir))
    if not os.path.isdir(workdir):
        raise FileNotFoundError(f"workdir {workdir} does not exist")
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{workdir} holds no run: it has no {CONFIG_FILE} (train_and_evaluate writes it "
            "when a run starts)"
        )
    for entry in reversed(read_history(workdir)):
        if "config" in entry:
            return ml_collections.ConfigDict(entry["config"])
    with open(path) as f:
        try:
            return ml_collections.ConfigDict(json.load(f))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e})") from None


def segment_start(workdir: str) -> int:
    """The step the current training segment started from (0 unless fine-tuned)."""
    for entry in reversed(read_history(workdir)):
        if "segment_start" in entry:
            return int(entry["segment_start"])
    return 0


def checkpoint_steps(workdir: str) -> list[int]:
    """The steps of the finished checkpoints in ``workdir/checkpoints`` (directory names)."""
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        return []
    return sorted(int(p) for p in os.listdir(directory) if p.isdigit())


@dataclasses.dataclass(frozen=True)
class StartPlan:
    """How a start proceeds: ``event`` (see the module docstring), the differences against
    the config in force (``identity_changes`` refuse a plain resume, ``changes`` are every
    key), and the segment the run belongs to."""

    workdir: str
    event: str
    identity_changes: dict
    changes: dict
    segment_start: int

    @property
    def resumes(self) -> bool:
        return self.event == "resume"


def plan_start(config, workdir: str, on_config_change: str = "refuse") -> StartPlan:
    """Reads the workdir (writes nothing) and decides how ``config`` may start there;
    ConfigMismatchError when its identity differs and ``on_config_change`` is "refuse"."""
    if on_config_change not in POLICIES:
        raise ValueError(f"on_config_change must be one of {POLICIES}, got {on_config_change!r}")
    if not has_run(workdir):
        return StartPlan(workdir, "new", {}, {}, 0)
    recorded = load_config(workdir)
    ident = differences(recorded, config)
    every = differences(recorded, config, only_identity=False)
    if not ident:  # the same run: it resumes, whatever on_config_change says
        return StartPlan(workdir, "resume", {}, every, segment_start(workdir))
    if on_config_change == "fresh":
        return StartPlan(workdir, "fresh", ident, every, 0)
    if on_config_change == "fine_tune":
        return StartPlan(workdir, "fine_tune", ident, every, segment_start(workdir))
    raise ConfigMismatchError(
        f"{workdir} holds a run with another config: {describe(ident)}. Nothing was "
        "changed on disk. To train this config there anyway, start it with "
        'on_config_change="fine_tune" (launcher: --fine_tune: from the newest '
        "checkpoint's parameters, a fresh optimizer and schedule) or "
        f'on_config_change="fresh" (--fresh: the run there moves to {PREVIOUS_DIR}/<k>/ '
        "and this one starts at step 0); or choose another workdir.",
        ident,
    )


def move_run_aside(workdir: str) -> str:
    """Moves the workdir's run (config, history, checkpoints, metrics, events) into
    ``previous/<k>/`` (k one more than the largest there); returns that path."""
    root = os.path.join(workdir, PREVIOUS_DIR)
    os.makedirs(root, exist_ok=True)
    taken = [int(p) for p in os.listdir(root) if p.isdigit()]
    dest = os.path.join(root, str(max(taken, default=0) + 1))
    os.makedirs(dest)
    for name in RUN_ENTRIES:
        src = os.path.join(workdir, name)
        if os.path.exists(src):
            shutil.move(src, os.path.join(dest, name))
    return dest


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def _write_config(config, workdir: str) -> None:
    path = os.path.join(workdir, CONFIG_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(config.to_json_best_effort(indent=2, sort_keys=True))
    os.replace(tmp, path)


def _append(workdir: str, entry: dict) -> None:
    path = os.path.join(workdir, HISTORY_FILE)
    with open(path, "a") as f:
        f.write(json.dumps(entry, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


def record_start(plan: StartPlan, config, *, step: int, segment_start: int) -> dict:
    """Writes what this start means: ``config.json`` for a new run (after moving the old
    run aside for a fresh one) and a history line. Returns the line."""
    workdir = plan.workdir
    os.makedirs(workdir, exist_ok=True)
    entry = {
        "time": _now(),
        "event": plan.event,
        "step": int(step),
        "segment_start": int(segment_start),
        "changes": {k: list(v) for k, v in plan.changes.items()},
    }
    if plan.event == "fresh":
        previous = move_run_aside(workdir)
        entry["previous"] = os.path.relpath(previous, workdir)
    if plan.event in ("new", "fresh"):
        _write_config(config, workdir)
    elif plan.changes:
        entry["config"] = _plain(config)
    _append(workdir, entry)
    return entry
