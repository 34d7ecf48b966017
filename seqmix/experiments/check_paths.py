"""A model's loss and gradients through one kernel implementation against XLA's, on one batch.

    python -m seqmix.experiments.check_paths \
        --config=recall:mixer=gla,d_model=128,seq_len=512,num_kv_pairs=64 \
        --implementation=pallas_triton --config.train.batch_size=2

Builds the config's model from its seed and the first training batch of its task, then
computes the loss and every parameter gradient three times: XLA in float32 (the yardstick),
XLA at the config's compute dtype, and ``--implementation`` for the ``--ops`` at that dtype
(a Pallas kernel off its platform runs in interpret mode). It prints, per path, the loss
difference from the yardstick and the relative gradient errors (the norm of the difference
over the yardstick's norm): the median over parameters and the four largest. A kernel path
whose errors match XLA's at the same dtype differs from it by no more than that dtype's own
spread; one whose errors stand out computes something else.
"""

from __future__ import annotations

import time

from absl import flags

from seqmix.experiments import cli


def _define_flags() -> None:
    """The launcher's flags, defined when it runs (not on import: the functions below are a
    library too, imported beside other launchers that define ``--config``)."""
    flags.DEFINE_string("config", None, cli.CONFIG_HELP.format(names="mqar, recall, ..."))
    flags.DEFINE_string("implementation", "pallas_triton", "The implementation to check.")
    flags.DEFINE_list(
        "ops", ["linear_attention"], "The kernel ops that run --implementation (the others: XLA)."
    )
    flags.mark_flags_as_required(["config"])


def gradients(config, implementation: dict | None, dtype: str):
    """``(loss, flat gradients)`` of ``config``'s model on its first training batch, with the
    model's ``implementation`` mapping and compute ``dtype``."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from seqmix import data
    from seqmix.kernels import dispatch
    from seqmix.train import losses, steps, workdir

    config = config.copy_and_resolve_references()
    config.train.compute_dtype = dtype
    batch = {k: jnp.asarray(v) for k, v in data.make_task(config).train_batch(1).items()}
    model_config = steps.model_config_of(config)
    model_config.implementation = implementation
    graphdef, params, rngs, other = steps.split(steps.build(model_config, int(config.seed)))

    def loss_fn(params):
        model = nnx.merge(graphdef, params, rngs, other)
        sums = losses.batch_sums(config.model.kind, steps.apply_model(model, batch), batch)
        return sums["loss_sum"] / jnp.maximum(sums["count"], 1.0)

    interpret = any(
        dispatch.PALLAS_PLATFORMS.get(name) not in (None, dispatch.platform())
        for name in (implementation or {}).values()
    )
    with dispatch.interpret(interpret):
        loss, grads = jax.value_and_grad(loss_fn)(params)
    flat = workdir.flatten(nnx.to_pure_dict(grads))
    return float(loss), {name: np.asarray(g, np.float32) for name, g in flat.items()}


def compare(reference: tuple, other: tuple) -> dict:
    """``{"loss_diff", "median", "largest": [(name, error)] * 4}`` of ``other`` against
    ``reference`` (each ``(loss, flat gradients)``)."""
    import numpy as np

    errors = {
        name: float(np.linalg.norm(other[1][name] - g) / (np.linalg.norm(g) + 1e-30))
        for name, g in reference[1].items()
    }
    largest = sorted(errors.items(), key=lambda kv: -kv[1])[:4]
    return {
        "loss_diff": abs(other[0] - reference[0]),
        "median": float(np.median(list(errors.values()))),
        "largest": largest,
    }


def main(args: cli.Args):
    if len(args.argv) > 1:
        cli.fail(f"unexpected arguments: {args.argv[1:]}")
    from seqmix.kernels import dispatch

    impl, ops = flags.FLAGS.implementation, flags.FLAGS.ops
    config = cli.load_config(flags.FLAGS.config, args.overrides)
    mapping = {op: impl for op in ops}
    try:
        dispatch.check_implementation(mapping, "--implementation")
    except ValueError as e:
        cli.fail(str(e))
    dtype = config.train.get("compute_dtype", None) or "float32"
    t0 = time.time()
    reference = gradients(config, {op: "xla" for op in ops}, "float32")
    print(f"yardstick: XLA in float32, loss {reference[0]:.6g} ({time.time() - t0:.0f} s)")
    for implementation in ("xla", impl):
        t0 = time.time()
        result = compare(reference, gradients(config, {op: implementation for op in ops}, dtype))
        largest = ", ".join(f"{name} {err:.4f}" for name, err in result["largest"])
        print(
            f"{implementation} at {dtype}: loss diff {result['loss_diff']:.3g}, gradient error "
            f"median {result['median']:.4f}, largest {largest} ({time.time() - t0:.0f} s)",
            flush=True,
        )


def run() -> None:
    _define_flags()
    cli.run(main, __doc__)


if __name__ == "__main__":
    run()
