"""Continues a prompt with the model of a run directory and prints the result.

    seqmix-generate --workdir=~/seqmix-runs/lm_bytes --prompt="def " --max_new_tokens=300
    seqmix-generate --workdir=~/seqmix-runs/lm_bytes --prompt="import " --top_k=20 --num_samples=3
    python -m seqmix.experiments.generate --workdir=~/seqmix-runs/mqar --prompt_tokens=5,9,17

Restores the newest checkpoint of ``--workdir`` (``seqmix.train.restore_model``) and calls
``seqmix.models.generate``. For a byte-level model (``data.task="bytes"``) ``--prompt`` is
text, encoded as UTF-8 bytes (``seqmix.data.bytes.encode``), and the output is printed as
text (``decode``); for any other model give ``--prompt_tokens`` and the new token ids are
printed. Sampling: ``--temperature`` (0: greedy), ``--top_k``, ``--top_p``, ``--seed``;
``--stop_tokens`` ends a sample at any of these ids (for the byte model, 0 is the byte
between two source files of its corpus). Each sample prints the prompt followed by its
continuation unless ``--new_only``.
"""

from __future__ import annotations

import os
import sys

from absl import flags

from seqmix.experiments import cli

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory written by seqmix-train.")
_PROMPT = flags.DEFINE_string("prompt", None, "Prompt text (byte-level models).")
_PROMPT_TOKENS = flags.DEFINE_list("prompt_tokens", None, "Prompt token ids (any model).")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 200, "Tokens to generate per sample.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.8, "Sampling temperature (0: greedy).")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens (0: all).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling probability (1: off).")
_STOP = flags.DEFINE_list("stop_tokens", [], "Token ids that end a sample.")
_SAMPLES = flags.DEFINE_integer("num_samples", 1, "Samples to draw from the prompt.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the sampling.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
_NEW_ONLY = flags.DEFINE_bool("new_only", False, "Print only the generated continuation.")
flags.mark_flags_as_required(["workdir"])


def _ints(values, flag: str) -> list[int]:
    try:
        return [int(v) for v in values]
    except ValueError:
        cli.fail(f"--{flag} takes integers separated by commas, got {','.join(values)}")


def main(args: cli.Args):
    if len(args.argv) > 1 or args.overrides:
        cli.fail(f"unexpected arguments: {args.argv[1:]} {args.overrides or ''}".strip())
    import jax
    import numpy as np

    from seqmix.data import bytes as bytes_lm
    from seqmix.models import generate
    from seqmix.train import restore_model

    try:
        model, config = restore_model(os.path.expanduser(_WORKDIR.value), step=_STEP.value)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        cli.fail(str(e))
    is_bytes = config.data.get("task", None) == "bytes"
    if _PROMPT_TOKENS.value:
        prompt = np.asarray(_ints(_PROMPT_TOKENS.value, "prompt_tokens"), np.int32)
    elif _PROMPT.value is not None and is_bytes:
        prompt = bytes_lm.encode(_PROMPT.value)
    elif _PROMPT.value is not None:
        cli.fail(
            f"--prompt is text, for byte-level models; the model of {_WORKDIR.value} is trained "
            f"on data.task={config.data.get('task')!r}: give --prompt_tokens=ID,ID,..."
        )
    else:
        cli.fail("give --prompt (text, byte-level models) or --prompt_tokens (token ids)")
    if prompt.size == 0:
        cli.fail("the prompt is empty: give at least one token")
    if _SAMPLES.value < 1:
        cli.fail(f"--num_samples must be >= 1, got {_SAMPLES.value}")
    try:
        out = generate(
            model,
            np.tile(prompt[None], (_SAMPLES.value, 1)),
            _MAX_NEW.value,
            temperature=_TEMPERATURE.value,
            top_k=_TOP_K.value or None,
            top_p=None if _TOP_P.value == 1.0 else _TOP_P.value,
            stop_tokens=_ints(_STOP.value, "stop_tokens"),
            new_tokens_only=_NEW_ONLY.value,
            rng=jax.random.key(_SEED.value),
        )
    except ValueError as e:
        cli.fail(str(e))
    out = np.asarray(out)
    for i, row in enumerate(out):
        if _SAMPLES.value > 1:
            print(f"--- sample {i + 1} ---")
        if is_bytes:
            print(bytes_lm.decode(row))
        else:
            print(" ".join(str(int(t)) for t in row if t >= 0))
    sys.stdout.flush()


def run() -> None:
    """The ``seqmix-generate`` command."""
    cli.run(main, __doc__)


if __name__ == "__main__":
    run()
