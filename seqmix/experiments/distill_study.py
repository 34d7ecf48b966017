"""The distillation study on the CPU: a byte-level attention LM, then hybrids that replace 3 of
its 4 attention layers, reached three ways, compared on held-out bits per byte.

    python -m seqmix.experiments.distill_study [--runs_dir=DIR] [--out=FILE]

Every run trains with the one training loop in its own workdir under ``--runs_dir`` (default
``$SEQMIX_RUNS/distill_study`` or ``~/seqmix-runs/distill_study``), so running the command
again resumes where it stopped and skips finished runs. The runs:

- ``teacher``: ``lm_bytes:mixer=attention`` (4 attention layers, d_model 128) for
  ``--teacher_steps``.
- per student mixer (``--mixers``, default mamba2 and gla), layers 1, 2, 3 replaced:
  ``distilled`` (``distill``: the mixers initialised from the teacher's attention weights,
  ``--transfer_steps`` of attention transfer, then ``--e2e_steps`` end to end against the
  teacher's logits); ``random_init`` (the same two stages with the new mixers drawn from
  the seed: the ablation of the attention initialisation; the rest of the model is still the
  teacher's); ``scratch`` (the same hybrid, every parameter drawn from the seed, trained on
  cross-entropy with ``lm_bytes``'s optimizer settings for as many steps as the two stages).

Every run uses ``--batch_size`` sequences of ``--seq_len`` bytes a step (defaults 16 x 128,
small enough for 2 CPU cores: the whole study took 78 minutes there), and every
student as many steps as the others. Each run's held-out metrics are its last evaluation
(the 16 held-out batches of ``lm_bytes``, the same for every run). Writes ``--out``
(default ``<runs_dir>/distill_study.json``): the stack, the settings, and one row per run
(bits per byte, the KL to the teacher where it was measured, steps, seconds).
``notebooks/04_distill.ipynb`` renders the stored copy in ``benchmarks/results/``.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import time

from absl import logging

VARIANTS = ("distilled", "random_init", "scratch")


@dataclasses.dataclass(frozen=True)
class Settings:
    """The study's sizes (the flags of the same names)."""

    mixers: tuple[str, ...] = ("mamba2", "gla")
    layers: str = "1+2+3"
    teacher_steps: int = 2000
    transfer_steps: int = 200
    e2e_steps: int = 800
    seq_len: int = 128
    batch_size: int = 16


def teacher_config(s: Settings, steps: int | None = None):
    """``lm_bytes:mixer=attention`` at the study's sizes."""
    from seqmix.configs import loader

    steps = s.teacher_steps if steps is None else steps
    config = loader.load(
        f"lm_bytes:mixer=attention,steps={steps},seq_len={s.seq_len},batch_size={s.batch_size}"
    )
    return _short_warmup(config, steps)


def distill_config(s: Settings, mixer: str, init: str):
    """``distill`` at the study's sizes (``init``: ``attention`` or ``random``)."""
    from seqmix.configs import loader

    config = loader.load(
        f"distill:mixer={mixer},init={init},layers={s.layers},"
        f"transfer_steps={s.transfer_steps},e2e_steps={s.e2e_steps},"
        f"seq_len={s.seq_len},batch_size={s.batch_size}"
    )
    return _short_warmup(config, min(s.transfer_steps, s.e2e_steps))


def scratch_config(s: Settings, student_model):
    """``lm_bytes`` (its data, optimizer and schedule) with the student's model config, for as
    many steps as the two distillation stages."""
    import ml_collections

    config = teacher_config(s, s.transfer_steps + s.e2e_steps)
    config = ml_collections.ConfigDict(config.to_dict(), type_safe=False)
    config.model = student_model
    return config


def _short_warmup(config, steps: int):
    """Warmup at most a tenth of ``steps`` (the shortest stage), for short trial runs."""
    config.optimizer.warmup_steps = min(int(config.optimizer.warmup_steps), max(1, steps // 10))
    return config


def same_data(a, b) -> None:
    """A ValueError unless ``a`` and ``b`` train and evaluate on the same batches."""
    keys = ("task", "seq_len", "val_fraction", "num_eval_batches")
    for k in keys:
        if a.data[k] != b.data[k]:
            raise ValueError(f"data.{k} differs between runs: {a.data[k]} vs {b.data[k]}")
    if a.train.batch_size != b.train.batch_size or a.seed != b.seed:
        raise ValueError("the runs differ in batch size or seed")
    if a.data.get("data_dir", "") != b.data.get("data_dir", ""):
        raise ValueError("the runs read different corpora (data.data_dir)")


def _row(name: str, mixer: str | None, result: dict, seconds: float) -> dict:
    ev = result["eval"]
    return {
        "run": name,
        "mixer": mixer,
        "step": int(result["step"]),
        "bits_per_byte": float(ev["bits_per_byte"]),
        "accuracy": float(ev["accuracy"]) if "accuracy" in ev else None,
        "kl": float(ev["kl"]) if "kl" in ev else None,
        "seconds": round(seconds, 1),
    }


def _train(config, workdir: str, builder=None) -> tuple[dict, float]:
    from seqmix import train

    t0 = time.perf_counter()
    kw = {} if builder is None else {"program_builder": builder}
    result = train.train_and_evaluate(config, workdir, **kw)
    if result["stopped_by"]:
        raise SystemExit(f"{workdir}: stopped by {result['stopped_by']} (run again to resume)")
    return result, time.perf_counter() - t0


def _write(path: str, doc: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, path)


def study(runs: str, out: str, s: Settings = Settings()) -> dict:
    """Trains (or resumes, or skips when finished) every run of the study under ``runs`` and
    writes the results to ``out``; returns them."""
    import jax

    from seqmix.train import distill

    os.makedirs(runs, exist_ok=True)
    doc = {
        "date": datetime.date.today().isoformat(),
        "stack": {
            "jax": jax.__version__,
            "python": platform.python_version(),
            "device": f"{jax.devices()[0].platform} x{jax.device_count()}",
            "cpu_cores": os.cpu_count(),
        },
        "settings": {
            "teacher": "lm_bytes:mixer=attention (4 layers, d_model 128, 4 heads, SwiGLU)",
            **dataclasses.asdict(s),
            "student_steps": s.transfer_steps + s.e2e_steps,
        },
        "rows": [],
    }

    teacher_dir = os.path.join(runs, "teacher")
    t_config = teacher_config(s)
    result, secs = _train(t_config, teacher_dir)
    doc["rows"].append(_row("teacher", "attention", result, secs))
    _write(out, doc)
    teacher = distill.load_teacher(teacher_dir)

    for mixer in s.mixers:
        student_model = None
        for variant in VARIANTS:
            workdir = os.path.join(runs, f"{mixer}-{variant}")
            logging.info("distill study: %s", workdir)
            if variant == "scratch":
                config = scratch_config(s, student_model)
                same_data(config, t_config)
                result, secs = _train(config, workdir)
            else:
                init = "attention" if variant == "distilled" else "random"
                config, student = distill.prepare(distill_config(s, mixer, init), teacher)
                same_data(config, t_config)
                student_model = config.model
                result, secs = _train(config, workdir, distill.program_builder(teacher, student))
            doc["rows"].append(_row(variant, mixer, result, secs))
            _write(out, doc)
    return doc


def run() -> None:
    """Defines the flags (only when run as a program) and runs the study."""
    from absl import app, flags

    defaults = Settings()
    runs_dir = flags.DEFINE_string(
        "runs_dir",
        None,
        "Where the runs go (default $SEQMIX_RUNS/distill_study, or ~/seqmix-runs/distill_study).",
    )
    out = flags.DEFINE_string(
        "out", None, "The results file (default <runs_dir>/distill_study.json)."
    )
    mixers = flags.DEFINE_list("mixers", list(defaults.mixers), "Student mixers.")
    layers = flags.DEFINE_string("layers", defaults.layers, "The replaced layers, joined by '+'.")
    ints = {
        "teacher_steps": "The teacher's training steps.",
        "transfer_steps": "Attention-transfer steps.",
        "e2e_steps": "End-to-end distillation steps.",
        "seq_len": "Bytes per sequence (every run).",
        "batch_size": "Sequences per step (every run).",
    }
    ints = {k: flags.DEFINE_integer(k, getattr(defaults, k), h) for k, h in ints.items()}

    def main(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        from seqmix.configs import loader

        runs = os.path.expanduser(
            runs_dir.value or os.path.join(loader.runs_root(), "distill_study")
        )
        path = os.path.expanduser(out.value or os.path.join(runs, "distill_study.json"))
        s = Settings(
            mixers=tuple(mixers.value),
            layers=layers.value,
            **{k: v.value for k, v in ints.items()},
        )
        doc = study(runs, path, s)
        for r in doc["rows"]:
            print(
                f"{r['run']:12s} {r['mixer']:10s} step {r['step']:5d}  bpb {r['bits_per_byte']:.4f}"
            )
        print(f"results: {path}")

    app.run(main)


if __name__ == "__main__":
    run()
