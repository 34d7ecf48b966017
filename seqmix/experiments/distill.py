"""Distils a trained transformer into a converted hybrid with the training loop; resumes
from the workdir's checkpoints.

    python -m seqmix.experiments.distill --config=distill \\
        --config.distill.teacher=~/seqmix-runs/lm_bytes-mixer=attention
    seqmix-distill --config=distill:mixer=gla,layers=1+2+3 --config.distill.teacher=PATH
    seqmix-distill --config=distill:progressive=true --config.distill.teacher=path/to/hf-model

The teacher (``--config.distill.teacher``) is a seqmix run directory of a trained causal LM
or a local Hugging Face checkpoint directory. The student is the teacher with the layers
of ``distill.stages`` converted to ``distill.mixer`` (``seqmix.models.convert``); its
model config is recorded in the workdir's ``config.json``, so ``restore_model`` and
``seqmix-generate --workdir=...`` read the distilled student like any run. The stages,
objectives and metrics are described in ``seqmix.train.distill``.

The workdir defaults to ``$SEQMIX_RUNS/<config name>[-<variant>]`` (``~/seqmix-runs/...``
when SEQMIX_RUNS is unset); running the same command again resumes. A config that
differs from the one recorded there (the teacher, the stages, the model, the data, the
optimizer) is refused unless ``--fresh`` moves the recorded run to ``previous/<k>/``.

Exit status: 0 when done, 1 on non-finite values, 2 for a bad config, teacher or workdir,
3 when a checkpoint cannot be written, 143 when stopped by SIGTERM and 130 by Ctrl-C (a
checkpoint is saved first: resumable).
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
    "when SEQMIX_RUNS is unset).",
)
_FRESH = flags.DEFINE_bool(
    "fresh",
    False,
    "When the workdir's run has another config: move that run to <workdir>/previous/<k>/ and "
    "start this one at step 0.",
)
flags.mark_flags_as_required(["config"])


def main(args: cli.Args):
    if len(args.argv) > 1:
        cli.fail(f"unexpected arguments: {args.argv[1:]}")
    from seqmix.configs.loader import default_workdir

    logging.get_absl_handler().addFilter(cli.QuietLibraries())
    config = cli.load_config(_CONFIG.value, args.overrides)
    from seqmix import train  # after flag parsing: keeps --help fast
    from seqmix.train import distill

    workdir = os.path.expanduser(_WORKDIR.value or default_workdir(_CONFIG.value))
    try:
        settings = distill.settings_of(config)
        teacher = distill.load_teacher(settings.teacher, format=settings.teacher_format)
        config, student = distill.prepare(config, teacher)
    except (ValueError, FileNotFoundError) as e:
        cli.fail(str(e))
    logging.info("teacher %s (%s); config:\n%s", teacher.path, teacher.format, config)
    cli.train_and_report(
        lambda: train.train_and_evaluate(
            config,
            workdir,
            on_config_change="fresh" if _FRESH.value else "refuse",
            program_builder=distill.program_builder(teacher, student),
        )
    )


def run() -> None:
    """The ``seqmix-distill`` command."""
    _CONFIG.help = cli.config_help("distill")
    cli.run(main, __doc__)


if __name__ == "__main__":
    run()
