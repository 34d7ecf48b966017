"""What the launchers share: ``--config`` by name or path with ``--config.<key>=<value>``
overrides, and the entry points of the installed commands.

Installed commands (``[project.scripts]`` in pyproject.toml), each the same as
``python -m seqmix.experiments.<module>``:

| command | module |
| --- | --- |
| ``seqmix-train`` | ``seqmix.experiments.train`` |
| ``seqmix-generate`` | ``seqmix.experiments.generate`` |
| ``seqmix-bench-model`` | ``seqmix.experiments.bench_model`` |
| ``seqmix-bench-kernels`` | ``seqmix.experiments.bench_kernels`` |
| ``seqmix-recall-sweep`` | ``seqmix.experiments.recall_sweep`` |
| ``seqmix-distill`` | ``seqmix.experiments.distill`` |
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import sys
from collections.abc import Callable

from absl import app, flags

CONFIG_HELP = (
    "Experiment config: a stock config by name ({names}) or a .py file defining "
    "get_config(arg), optionally followed by ':' and its variant argument, e.g. "
    "--config=mqar:mixer=gla or --config=path/to/my.py. --config.<key>=<value> overrides any "
    "key, type-checked (--config.model.d_model=128, --config.model.layers=GGGA or "
    "--config.model.layers=gla,gla,gla,attention, --config.train.compute_dtype=bfloat16)."
)


class QuietLibraries:
    """A logging filter that drops INFO lines of orbax and jax (one per array write):
    warnings still show."""

    PATHS = (f"{os.sep}orbax{os.sep}", f"{os.sep}jax{os.sep}_src{os.sep}")

    def filter(self, record) -> bool:
        return record.levelno >= 30 or not any(p in record.pathname for p in self.PATHS)


def config_help(launcher: str | None = None) -> str:
    """``--config``'s help, naming the stock configs of ``launcher`` (None: all)."""
    from seqmix.configs.loader import stock_names

    return CONFIG_HELP.format(names=", ".join(stock_names(launcher)))


@dataclasses.dataclass(frozen=True)
class Args:
    """What a launcher's ``main`` receives: the positional arguments absl left, and the
    ``--config.<key>=<value>`` overrides in command-line order."""

    argv: list[str]
    overrides: list[tuple[str, str]]


def split_overrides(argv: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """``(other arguments, [(key, value)])``: ``--config.a.b=v`` and ``--config.a.b v`` are
    overrides; every other argument is left for absl."""
    rest, overrides = [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--config."):
            body = arg[len("--config.") :]
            if "=" in body:
                key, value = body.split("=", 1)
            elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                key, value = body, argv[i + 1]
                i += 1
            else:
                raise app.UsageError(f"{arg}: give a value, as {arg}=VALUE")
            overrides.append((key, value))
        else:
            rest.append(arg)
        i += 1
    return rest, overrides


def _parser(argv: list[str]) -> Args:
    rest, overrides = split_overrides(argv[1:])
    positional = flags.FLAGS(argv[:1] + rest)  # absl reports a flags.Error with the usage
    return Args(list(positional), overrides)


def run(main: Callable[[Args], None], doc: str | None = None) -> None:
    """``absl.app.run(main)`` with ``--config.<key>=<value>`` overrides collected into
    ``Args.overrides``; ``doc`` is the text ``--help`` shows above the flags."""
    if doc is not None:
        sys.modules["__main__"].__doc__ = doc
    app.run(main, flags_parser=_parser)


def load_config(spec: str, overrides: list[tuple[str, str]]):
    """The config of ``spec`` with ``overrides`` applied; errors exit with a message naming
    the key (status 2)."""
    from seqmix.configs import loader

    try:
        config = loader.load(spec)
        return loader.apply_overrides(config, overrides)
    except ValueError as e:
        fail(str(e))


def fail(message: str, status: int = 2):
    """Prints ``ERROR: message`` and exits with ``status``."""
    sys.stderr.write(f"ERROR: {message}\n")
    sys.stderr.flush()
    sys.exit(status)


def train_and_report(run: Callable[[], dict]) -> None:
    """Runs ``run`` (a ``seqmix.train.train_and_evaluate`` call) and reports as the training
    launchers do: the workdir, a stop by signal (exit 143 / 130, resumable), or the final
    evaluation; a failed checkpoint save exits 3 at once, a non-finite loss 1, a ValueError
    (a bad config, a differing run in the workdir) 2 with its message."""
    from absl import logging

    from seqmix import train

    try:
        result = run()
    except train.CheckpointSaveError as e:
        sys.stdout.flush()
        sys.stderr.write(f"STOPPED: {e}\n")
        sys.stderr.flush()
        logging.flush()
        # orbax's threads of the failed save may never finish: do not wait for them
        os._exit(3)
    except FloatingPointError as e:
        logging.error("%s", e)
        print(f"STOPPED: {e}", file=sys.stderr)
        sys.exit(1)
    except ValueError as e:
        fail(str(e))
    print(f"workdir: {result['workdir']} (metrics.jsonl, tensorboard/, checkpoints/)", flush=True)
    if result["stopped_by"]:
        print(
            f"stopped by {result['stopped_by']} at step {result['step']} (checkpoint saved); "
            "run the same command to resume",
            flush=True,
        )
        sys.exit({"SIGTERM": 143, "SIGINT": 130}.get(result["stopped_by"], 0))
    metrics = result["eval"]
    summary = " ".join(f"{k}={v:.4f}" for k, v in metrics.items())
    metric = result.get("metric")
    if metric in metrics:
        summary = f"{metric} = {metrics[metric]:.4f} ({summary})"
    print(f"FINAL eval at step {result['step']}: {summary}", flush=True)


def _entry(module: str) -> None:
    mod = importlib.import_module(f"seqmix.experiments.{module}")
    if hasattr(mod, "run"):
        mod.run()
    else:  # an absl module with main(argv) and no --config overrides
        sys.modules["__main__"].__doc__ = mod.__doc__
        app.run(mod.main)


def train() -> None:
    _entry("train")


def generate() -> None:
    _entry("generate")


def bench_model() -> None:
    _entry("bench_model")


def bench_kernels() -> None:
    _entry("bench_kernels")


def recall_sweep() -> None:
    _entry("recall_sweep")


def distill() -> None:
    _entry("distill")
