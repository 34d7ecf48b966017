"""Trains and evaluates one experiment config; resumes from the workdir's checkpoints.

    python -m seqmix.experiments.train --config=seqmix/configs/mqar.py
    python -m seqmix.experiments.train --config=seqmix/configs/mqar.py:mixer=attention --workdir=/tmp/run
    python -m seqmix.experiments.train --config=seqmix/configs/lm_bytes.py --config.train.num_steps=200

``--config.<key>=<value>`` overrides any key of the config. The workdir (default
``./runs/<config name>[-<variant>]``) receives ``config.json``, ``metrics.jsonl``,
``tensorboard/`` and ``checkpoints/<step>/``; running the same command again resumes.
Exit status: 0 when done, 1 on non-finite values, 143 when stopped by SIGTERM (resumable).
"""

from __future__ import annotations

import os
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (configs/<name>.py[:variant]).", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (default ./runs/<config name>).")
flags.mark_flags_as_required(["config"])


def default_workdir(config_arg: str) -> str:
    """``runs/<file stem>`` or ``runs/<file stem>-<variant>`` for ``path/to/stem.py:variant``."""
    path, _, variant = config_arg.partition(":")
    name = os.path.splitext(os.path.basename(path))[0]
    if variant:
        name += "-" + re.sub(r"[^A-Za-z0-9_.=-]+", "_", variant.replace(",", "-"))
    return os.path.join("runs", name)


class _QuietLibraries:
    """Drops INFO lines of orbax and jax (one per array write): warnings still show."""

    PATHS = (f"{os.sep}orbax{os.sep}", f"{os.sep}jax{os.sep}_src{os.sep}")

    def filter(self, record) -> bool:
        return record.levelno >= 30 or not any(p in record.pathname for p in self.PATHS)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.get_absl_handler().addFilter(_QuietLibraries())
    from seqmix import train  # after flag parsing: keeps --help fast

    config = _CONFIG.value
    workdir = _WORKDIR.value or default_workdir(
        config_flags.get_config_filename(flags.FLAGS["config"])
    )
    logging.info("config:\n%s", config)
    try:
        result = train.train_and_evaluate(config, workdir)
    except FloatingPointError as e:
        logging.error("%s", e)
        print(f"STOPPED: {e}", file=sys.stderr)
        sys.exit(1)
    print(f"workdir: {result['workdir']} (metrics.jsonl, tensorboard/, checkpoints/)", flush=True)
    if result["stopped_by"]:
        print(
            f"stopped by {result['stopped_by']} at step {result['step']} (checkpoint saved); "
            "run the same command to resume",
            flush=True,
        )
        sys.exit(143)
    metrics = result["eval"]
    summary = " ".join(f"{k}={v:.4f}" for k, v in metrics.items())
    print(
        f"FINAL eval at step {result['step']}: {result['metric']} = "
        f"{metrics[result['metric']]:.4f} ({summary})",
        flush=True,
    )


if __name__ == "__main__":
    app.run(main)
