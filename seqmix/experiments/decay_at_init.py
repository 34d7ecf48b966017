"""How far a model's data-dependent decays carry a token at initialisation, on one batch.

    python -m seqmix.experiments.decay_at_init \
        --config=recall:mixer=gla,d_model=512,seq_len=512,num_kv_pairs=64

Builds the config's model from its seed, runs it on the first training batch of its task
(eagerly, float32) and records every decay that a mixer computes from its input (GLA's
per-channel gate, Gated DeltaNet's per-head ``-exp(A) softplus(.)``). Per layer it prints
the mean log decay per token and, over the decay's heads (and channels), the median and
largest fraction of a token's contribution left after ``--gaps`` tokens,
``exp(gap * mean log decay)``. A recall task whose keys and queries lie further apart than
the decay carries at initialisation gives the gate almost no gradient to learn from.
"""

from __future__ import annotations

from absl import flags

from seqmix.experiments import cli


def _define_flags() -> None:
    flags.DEFINE_string("config", None, cli.CONFIG_HELP.format(names="recall, mqar, ..."))
    flags.DEFINE_list("gaps", [], "Gaps in tokens (default: an eighth and half of seq_len).")
    flags.mark_flags_as_required(["config"])


def decays(config) -> list[dict]:
    """Per mixer call that computed a decay, in call order: ``{"layer": class name, "mean":
    mean log decay, "per_unit": mean log decay per head (and channel), flattened}``."""
    import jax.numpy as jnp
    import numpy as np

    from seqmix import data
    from seqmix.layers import gated_deltanet, linear_attention
    from seqmix.train import steps

    config = config.copy_and_resolve_references()
    config.train.compute_dtype = "float32"
    batch = {k: jnp.asarray(v) for k, v in data.make_task(config).train_batch(1).items()}
    model = steps.build(steps.model_config_of(config), int(config.seed))
    records = []
    classes = (linear_attention.LinearAttention, gated_deltanet.GatedDeltaNet)
    originals = {cls: cls._log_decay for cls in classes}

    def spy(original):
        def log_decay(self, x):
            g = original(self, x)
            if g is not None:
                per_unit = np.asarray(jnp.mean(g, axis=(0, 1))).ravel()  # [heads(, channels)]
                records.append(
                    {
                        "layer": type(self).__name__,
                        "mean": float(per_unit.mean()),
                        "per_unit": per_unit,
                    }
                )
            return g

        return log_decay

    try:
        for cls, original in originals.items():
            cls._log_decay = spy(original)
        steps.apply_model(model, batch)
    finally:
        for cls, original in originals.items():
            cls._log_decay = original
    return records


def retention(per_unit, gap: int) -> tuple[float, float]:
    """``(median, max)`` over units of ``exp(gap * mean log decay)``."""
    import numpy as np

    kept = np.exp(gap * np.asarray(per_unit, np.float64))
    return float(np.median(kept)), float(kept.max())


def main(args: cli.Args):
    if len(args.argv) > 1:
        cli.fail(f"unexpected arguments: {args.argv[1:]}")
    import math

    config = cli.load_config(flags.FLAGS.config, args.overrides)
    seq_len = int(config.data.seq_len)
    try:
        gaps = [int(g) for g in flags.FLAGS.gaps] or [max(1, seq_len // 8), max(1, seq_len // 2)]
    except ValueError:
        cli.fail(f"--gaps must be whole numbers, got {flags.FLAGS.gaps}")
    records = decays(config)
    if not records:
        cli.fail("the model has no mixer with a data-dependent decay")
    for i, r in enumerate(records):
        kept = ", ".join(
            "gap {}: median {:.2e} max {:.2e}".format(g, *retention(r["per_unit"], g)) for g in gaps
        )
        print(
            f"layer {i} {r['layer']}: mean log decay {r['mean']:+.4f} "
            f"(decay {math.exp(r['mean']):.4f} per token); left after {kept}",
            flush=True,
        )


def run() -> None:
    _define_flags()
    cli.run(main, __doc__)


if __name__ == "__main__":
    run()
