"""Training-step throughput and memory of a ~125M-parameter causal LM per mixer.

    python -m seqmix.experiments.bench_model [--mixers=attention,mamba2] [--lengths=2048,4096]

For every mixer (attention, mamba2, gla, based and a 3:1 mamba2/attention hybrid) and every
sequence length T, with the number of tokens per batch fixed: one AdamW training step of the
seqmix trainer (bf16 compute, float32 parameters, the kernels auto dispatch picks), timed
as ``experiments/bench/common.time_jax`` does. Reports tokens/s, model FLOP utilisation
(6 N FLOPs per token plus the causal attention term 6 L d T, against the bf16 matmul ceiling
measured in the same run) and memory (XLA's account of the compiled step, and the
allocator's peak so far in this process, ``process_peak_gb``: it only grows from row to
row, so only the first row's is that configuration's own). Writes JSON and a plot of time
per token against T.

Compilation dominates a sweep of 12-layer models: ``--compile_workers=N`` first compiles
every configuration in N processes into a persistent compilation cache (for at most
``--compile_budget_s``; what is not compiled by then is reported, not timed), then one
process times them all (each compile is then a cache hit). Parameters are initialised on
the host CPU and copied to the device: on the H200 XLA took over 3 minutes to compile the
jitted initialiser of the attention model (2026-11-28), longer than its training step.
"""

from __future__ import annotations

import json
import os
import time

from absl import app, flags

from seqmix.experiments.bench import precompile

_MIXERS = flags.DEFINE_list(
    "mixers",
    ["attention", "mamba2", "gla", "based", "hybrid"],
    "Mixers to time ('hybrid' = MMMA, 3 mamba2 : 1 attention).",
)
_LENGTHS = flags.DEFINE_list("lengths", ["2048", "4096", "8192", "16384"], "Sequence lengths.")
_TOKENS = flags.DEFINE_integer("tokens", 32768, "Tokens per batch (batch = tokens // T).")
_LAYERS = flags.DEFINE_integer("layers", 12, "Layers.")
_D_MODEL = flags.DEFINE_integer("d_model", 768, "Model width.")
_VOCAB = flags.DEFINE_integer("vocab", 32768, "Vocabulary size.")
_WORKERS = flags.DEFINE_integer("compile_workers", 0, "Parallel compile processes (0: none).")
_COMPILE_BUDGET = flags.DEFINE_float(
    "compile_budget_s", 300.0, "With compile_workers: stop compiling after this."
)
_COMPILE_ONLY = flags.DEFINE_string("compile_only", None, "Internal: 'i/n' shard to compile.")
_OUT = flags.DEFINE_string("out_dir", None, "Results folder (default benchmarks/results).")
_PEAK = flags.DEFINE_float(
    "peak_tflops",
    None,
    "The bf16 matmul ceiling for MFU (default: "
    "measured in this run; give it for toy runs on a CPU).",
)


def model_for(mixer: str, T: int):
    """The ~125M model config of ``mixer`` (12 x 768, SwiGLU MLPs, tied 32k vocabulary)."""
    from seqmix.models import model_config

    n = _LAYERS.value
    layers = ("MMMA" * n)[:n] if mixer == "hybrid" else [mixer] * n
    heads = max(1, _D_MODEL.value // 64)  # head dim 64
    return model_config(
        kind="causal_lm",
        vocab_size=_VOCAB.value,
        d_model=_D_MODEL.value,
        layers=layers,
        mlp={"type": "swiglu", "expansion": 4.0},
        dtype="bfloat16",
        max_length=T,
        mixers={
            "attention": {"num_heads": heads},
            "gla": {"num_heads": heads},
            "based": {"num_heads": heads, "feature_dim": 16, "window_size": 64},
            "mamba2": {"headdim": 64, "d_state": 128, "expand": 2},
        },
    )


def build_step(mixer: str, T: int):
    """(compiled train step, abstract inputs, model config, parameter count)."""
    import jax
    import jax.numpy as jnp

    from seqmix.train import loop, optimizer
    from seqmix.train.config import base_config

    cfg = base_config(model=model_for(mixer, T))
    cfg.optimizer.warmup_steps = 10
    parts = loop.split_model(cfg.model, seed=0)
    tx = optimizer.make_optimizer(cfg.optimizer, num_steps=1000)
    schedule = optimizer.learning_rate_schedule(cfg.optimizer, 1000)
    opt_state = jax.eval_shape(tx.init, parts.params)
    step_fn = loop.make_train_step(parts, tx, schedule, "causal_lm", seed=0)
    B = max(1, _TOKENS.value // T)
    batch = {
        "inputs": jax.ShapeDtypeStruct((B, T), jnp.int32),
        "targets": jax.ShapeDtypeStruct((B, T), jnp.int32),
        "mask": jax.ShapeDtypeStruct((B, T), jnp.float32),
    }
    state = loop.TrainState(parts.params, opt_state, parts.other)
    step = jax.ShapeDtypeStruct((), jnp.int32)
    jitted = jax.jit(step_fn, donate_argnums=0)
    compiled = jitted.lower(state, parts.rngs, batch, step).compile()
    n_params = int(sum(x.size for x in jax.tree.leaves(parts.params)))
    return compiled, (parts, tx, cfg, B), n_params


def _compile_shard(spec: str):
    precompile.setup_cache()
    jobs = [(m, int(t)) for m in _MIXERS.value for t in _LENGTHS.value]
    for m, t in precompile.shard(jobs, spec):
        t0 = time.time()
        try:
            build_step(m, t)
            open(_marker(m, t), "w").close()
            print(f"compiled {m} T={t} in {time.time() - t0:.0f}s", flush=True)
        except Exception as e:  # noqa: BLE001
            print(f"compile {m} T={t} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)


def _marker(mixer: str, T: int) -> str:
    return os.path.join(
        precompile.CACHE_DIR, f"compiled_{mixer}_{T}_{_LAYERS.value}x{_D_MODEL.value}"
    )


def _parallel_compile(n: int) -> float:
    for m in _MIXERS.value:
        for t in _LENGTHS.value:
            if os.path.exists(_marker(m, int(t))):
                os.remove(_marker(m, int(t)))
    return precompile.run_workers(
        "seqmix.experiments.bench_model",
        [
            f"--mixers={','.join(_MIXERS.value)}",
            f"--lengths={','.join(_LENGTHS.value)}",
            f"--tokens={_TOKENS.value}",
            f"--layers={_LAYERS.value}",
            f"--d_model={_D_MODEL.value}",
            f"--vocab={_VOCAB.value}",
        ],
        n,
        _COMPILE_BUDGET.value,
    )


def time_one(mixer: str, T: int, peak_tflops: float) -> dict:
    import jax
    import numpy as np

    from seqmix.experiments.bench import common
    from seqmix.models import layer_names
    from seqmix.train import loop

    t0 = time.time()
    compiled, (_parts, tx, cfg, B), n_params = build_step(mixer, T)
    compile_s = time.time() - t0
    with jax.default_device(jax.devices("cpu")[0]):  # see the module docstring
        params, rngs, other = loop._init_state(cfg.model, 0, None)
    params, rngs, other = jax.device_put((params, rngs, other), jax.devices()[0])
    state = loop.TrainState(params, tx.init(params), other)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, _VOCAB.value, (B, T + 1))
    batch = {
        "inputs": jax.numpy.asarray(tokens[:, :-1], "int32"),
        "targets": jax.numpy.asarray(tokens[:, 1:], "int32"),
        "mask": jax.numpy.ones((B, T), "float32"),
    }
    holder = {"state": state}

    def step(i):
        holder["state"], metrics = compiled(
            holder["state"], rngs, batch, jax.numpy.asarray(i, "int32")
        )
        return metrics["loss"]

    counter = iter(range(1, 10**9))
    seconds = common.time_jax(lambda: step(next(counter)), reps=3, target_s=1.0, max_n=20)
    n_attn = sum(1 for name in layer_names(cfg.model) if name == "attention")
    flops_per_token = 6 * n_params + 6 * n_attn * _D_MODEL.value * T
    tokens_per_s = B * T / seconds
    ma = compiled.memory_analysis()
    stats = jax.devices()[0].memory_stats() or {}
    return {
        "mixer": mixer,
        "T": T,
        "batch": B,
        "params_m": n_params / 1e6,
        "step_ms": seconds * 1e3,
        "tokens_per_s": tokens_per_s,
        "us_per_token": 1e6 / tokens_per_s,
        "mfu": flops_per_token * tokens_per_s / (peak_tflops * 1e12),
        "compiled_gb": (
            ma.argument_size_in_bytes
            + ma.output_size_in_bytes
            + ma.temp_size_in_bytes
            - ma.alias_size_in_bytes
        )
        / 2**30,
        "process_peak_gb": stats.get("peak_bytes_in_use", 0) / 2**30,
        "compile_s": compile_s,
        "loss": float(step(0)),
    }


def main(argv):
    del argv
    if _COMPILE_ONLY.value:
        _compile_shard(_COMPILE_ONLY.value)
        return
    from seqmix.experiments.bench import common

    if _WORKERS.value > 0:
        print(f"parallel compile: {_parallel_compile(_WORKERS.value):.0f}s", flush=True)
    precompile.setup_cache()
    peak = _PEAK.value or common.matmul_ceiling()
    print(f"bf16 matmul ceiling {peak:.0f} TFLOP/s", flush=True)
    rows = []
    for mixer in _MIXERS.value:
        for T in (int(t) for t in _LENGTHS.value):
            if _WORKERS.value > 0 and not os.path.exists(_marker(mixer, T)):
                row = {
                    "mixer": mixer,
                    "T": T,
                    "error": f"not compiled within --compile_budget_s={_COMPILE_BUDGET.value}",
                }
            else:
                try:
                    row = time_one(mixer, T, peak)
                except Exception as e:  # noqa: BLE001 - one config failing must not stop the run
                    row = {"mixer": mixer, "T": T, "error": f"{type(e).__name__}: {str(e)[:300]}"}
            print(json.dumps(row, default=float), flush=True)
            rows.append(row)
            # after every row: a run cut by its time limit keeps what it measured
            path = common.write_results("model", rows, {"bf16_matmul_tflops": peak}, _OUT.value)
    ok = [dict(r, impl=r["mixer"]) for r in rows if "error" not in r]
    for d in filter(None, [_OUT.value or common.RESULTS_DIR, os.environ.get("OUT")]):
        common.plot_time_vs_length(
            ok,
            os.path.join(d, "model_us_per_token.png"),
            y="us_per_token",
            title="125M LM train step, us per token",
        )
    print(f"wrote {path}")
    print(
        common.markdown_table(
            rows,
            [
                "mixer",
                "T",
                "batch",
                "params_m",
                "step_ms",
                "tokens_per_s",
                "mfu",
                "compiled_gb",
                "process_peak_gb",
                "error",
            ],
        )
    )


if __name__ == "__main__":
    app.run(main)
