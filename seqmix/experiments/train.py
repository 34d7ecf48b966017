"""Trains and evaluates one experiment config; resumes from the workdir's checkpoints.

    seqmix-train --config=mqar
    seqmix-train --config=mqar:mixer=attention --workdir=/tmp/run
    seqmix-train --config=lm_bytes --config.train.num_steps=200 --config.model.layers=MMMA
    python -m seqmix.experiments.train --config=path/to/my_config.py   # the same launcher

``--config`` names a stock config (``seqmix/configs/<name>.py``, found wherever seqmix is
installed) or a config file, with an optional ``:variant``; ``--config.<key>=<value>``
overrides any key of it, type-checked (the hybrid pattern as ``--config.model.layers=GGGA`` or
a comma list of mixer names).

The workdir defaults to ``$SEQMIX_RUNS/<config name>[-<variant>]``, or
``~/seqmix-runs/<config name>[-<variant>]`` when SEQMIX_RUNS is unset: the same directory
from wherever the command runs, never inside the source tree. It receives ``config.json``,
``config_history.jsonl``, ``metrics.jsonl``, ``tensorboard/`` and ``checkpoints/<step>/``;
running the same command again resumes. A config that differs from the one recorded there
(seed, model, data, optimizer, batch size, compute dtype) is refused, naming the keys, unless
``--fine_tune`` (continue from the newest checkpoint's parameters with the new config) or
``--fresh`` (move the recorded run to ``previous/<k>/``, start at step 0) is given.

The log marks the compile window (the first step's time, excluded from tok/s and ms/step),
reports ms per step, and lists the parameters per layer at the start.

Exit status: 0 when done, 1 on non-finite values, 2 for a bad config or a config that
differs from the workdir's, 3 when a checkpoint cannot be written, 143 when stopped by
SIGTERM and 130 by Ctrl-C (a checkpoint is saved first: resumable; a second Ctrl-C stops at
once).
"""

from __future__ import annotations

import os

from absl import flags, logging

from seqmix.experiments import cli

_CONFIG = flags.DEFINE_string("config", None, cli.CONFIG_HELP.format(names="see --helpfull"))
_WORKDIR = flags.DEFINE_string(
    "workdir",
    None,
    "Run directory (default: $SEQMIX_RUNS/<config name>, or ~/seqmix-runs/<config name> "
    "when SEQMIX_RUNS is unset; e.g. ~/seqmix-runs/mqar-mixer=gla for --config=mqar:mixer=gla).",
)
_FINE_TUNE = flags.DEFINE_bool(
    "fine_tune",
    False,
    "When the workdir's run has another config: train this one from its newest checkpoint's "
    "parameters (a fresh optimizer and schedule, train.num_steps more steps); recorded in "
    "config_history.jsonl.",
)
_FRESH = flags.DEFINE_bool(
    "fresh",
    False,
    "When the workdir's run has another config: move that run to <workdir>/previous/<k>/ and "
    "start this one at step 0.",
)
flags.mark_flags_as_required(["config"])


def default_workdir(config_arg: str) -> str:
    """``$SEQMIX_RUNS/<name>[-<variant>]`` (default ``~/seqmix-runs/...``) of a config spec."""
    from seqmix.configs.loader import default_workdir as of_spec

    return of_spec(config_arg)


def main(args: cli.Args):
    if len(args.argv) > 1:
        cli.fail(f"unexpected arguments: {args.argv[1:]}")
    if _FINE_TUNE.value and _FRESH.value:
        cli.fail("--fine_tune and --fresh exclude each other: choose one")
    logging.get_absl_handler().addFilter(cli.QuietLibraries())
    config = cli.load_config(_CONFIG.value, args.overrides)
    from seqmix import train  # after flag parsing: keeps --help fast

    workdir = os.path.expanduser(_WORKDIR.value or default_workdir(_CONFIG.value))
    policy = "fine_tune" if _FINE_TUNE.value else "fresh" if _FRESH.value else "refuse"
    logging.info("config:\n%s", config)
    cli.train_and_report(lambda: train.train_and_evaluate(config, workdir, on_config_change=policy))


def run() -> None:
    """The ``seqmix-train`` command."""
    _CONFIG.help = cli.config_help("train")
    cli.run(main, __doc__)


if __name__ == "__main__":
    run()
