"""Training-step time of the models of the training configs, one row per mixer and length.

    seqmix-bench-model                                   # --preset=lm: the ~125M byte LM
    seqmix-bench-model --preset=recall                   # the recall study's step per mixer
    seqmix-bench-model --config=mqar --mixers=attention,gla --lengths=64 --config.model.d_model=32
    python -m seqmix.experiments.bench_model ...         # the same launcher

Every model is built from a training config (``--config``, by name or path, with
``--config.<key>=<value>`` overrides), with ``:mixer=<name>`` appended to its variant for each
of ``--mixers`` (``hybrid``: the config's own layers) and ``data.seq_len`` set to each of
``--lengths``: so a row's parameter count and step are those of ``seqmix-train`` on the same
config (each row records the command). The step timed is the trainer's own
(``seqmix.train.build_program``: AdamW, the config's mesh and loss), on a batch of the
config's task (``task.train_batch``), with ``--tokens`` tokens per batch (batch = tokens //
T; 0: the config's ``train.batch_size``). Parameters are initialised on the host
(``init_state(on_host=True)``) and copied to the device.

Compute dtype (``--compute_dtype``): ``auto`` takes the config's ``train.compute_dtype`` on a
GPU or TPU and float32 on a CPU (bf16 matmuls are emulated there, slowly); ``float32`` or
``bfloat16`` force one.

Presets (defaults of ``--config``, ``--mixers``, ``--lengths``, ``--tokens``):

- ``lm``: ``lm_bytes`` at 12 layers of width 768 with a 32768-token vocabulary, head
  dimension 64 (~125M parameters), mixers attention, mamba2, gla, based and the 3:1
  mamba2/attention hybrid, T = 2048 ... 16384 at 32768 tokens per batch;
- ``recall``: the recall study's step (``recall`` at d_model 256, T 256, 16 pairs, batch 256,
  bfloat16 compute on a GPU), the study's mixers (``configs/recall.MIXERS``: attention,
  based, mamba2, gla, linear_attention, gated_deltanet, deltanet).

Each row reports ms per step, tokens/s, the ratio of its step time to attention's at the
same T (``vs_attention``), model FLOP utilisation against the bf16 matmul ceiling measured in
the same run (GPU/TPU only; 6 N FLOPs per token plus the causal attention term 6 L d T), and
memory (XLA's account of the compiled step; the allocator's peak so far in the process).

Results: JSON (and, where matplotlib is installed, a plot of time per token against T) in
``--out_dir``, default ``$SEQMIX_RUNS/bench_model`` or ``~/seqmix-runs/bench_model``, and in
``$OUT`` when set. ``--compile_workers=N`` first compiles every configuration in N processes
into a persistent compilation cache (at most ``--compile_budget_s``; what is not compiled by
then is reported, not timed).
"""

from __future__ import annotations

import json
import os
import time

from absl import flags

from seqmix.experiments import cli

PRESETS = {
    "lm": dict(
        config="lm_bytes:layers=12,d_model=768",
        overrides=[
            ("model.vocab_size", "32768"),
            ("model.mixers.attention.num_heads", "12"),
            ("model.mixers.gla.num_heads", "12"),
            ("model.mixers.based.num_heads", "12"),
            ("model.mixers.based.feature_dim", "16"),
            ("model.mixers.based.window_size", "64"),
            ("model.mixers.mamba2.headdim", "64"),
            ("model.mixers.mamba2.d_state", "128"),
        ],
        mixers=["attention", "mamba2", "gla", "based", "hybrid"],
        lengths=["2048", "4096", "8192", "16384"],
        tokens=32768,
    ),
    "recall": dict(
        config="recall:d_model=256,seq_len=256,num_kv_pairs=16,batch_size=256",
        overrides=[],
        mixers=None,  # the study's: configs/recall.MIXERS
        lengths=["256"],
        tokens=0,
    ),
}

_PRESET = flags.DEFINE_enum("preset", "lm", sorted(PRESETS), "Defaults (see the module doc).")
_CONFIG = flags.DEFINE_string("config", None, "Training config (default: the preset's).")
_MIXERS = flags.DEFINE_list("mixers", None, "Mixers ('hybrid': the config's own layers).")
_LENGTHS = flags.DEFINE_list("lengths", None, "Sequence lengths (data.seq_len).")
_TOKENS = flags.DEFINE_integer("tokens", None, "Tokens per batch (0: train.batch_size).")
_DTYPE = flags.DEFINE_enum(
    "compute_dtype", "auto", ["auto", "float32", "bfloat16"], "Compute dtype (see above)."
)
_WORKERS = flags.DEFINE_integer("compile_workers", 0, "Parallel compile processes (0: none).")
_COMPILE_BUDGET = flags.DEFINE_float(
    "compile_budget_s", 300.0, "With compile_workers: stop compiling after this."
)
_COMPILE_ONLY = flags.DEFINE_string("compile_only", None, "Internal: 'i/n' shard to compile.")
_OUT = flags.DEFINE_string(
    "out_dir", None, "Results folder (default $SEQMIX_RUNS/bench_model, ~/seqmix-runs/...)."
)
_PEAK = flags.DEFINE_float(
    "peak_tflops", None, "The bf16 matmul ceiling for MFU (default: measured on a GPU/TPU)."
)


def _study_mixers() -> list[str]:
    from seqmix.configs import recall

    return list(recall.MIXERS)


def settings(overrides: list[tuple[str, str]]) -> dict:
    """The run's config spec, overrides, mixers, lengths and tokens: the preset's, replaced
    by the flags given."""
    preset = PRESETS[_PRESET.value]
    return dict(
        config=_CONFIG.value or preset["config"],
        overrides=(preset["overrides"] if not _CONFIG.value else []) + list(overrides),
        mixers=_MIXERS.value or preset["mixers"] or _study_mixers(),
        lengths=[int(t) for t in (_LENGTHS.value or preset["lengths"])],
        tokens=preset["tokens"] if _TOKENS.value is None else _TOKENS.value,
    )


def compute_dtype(config) -> str:
    import jax

    if _DTYPE.value != "auto":
        return _DTYPE.value
    if jax.default_backend() == "cpu":
        return "float32"
    return config.train.get("compute_dtype", None) or config.model.get("dtype", "float32")


def with_mixer(spec: str, mixer: str) -> str:
    """``spec`` with ``mixer=<mixer>`` added to its variant (``hybrid``: unchanged)."""
    if mixer == "hybrid":
        return spec
    target, sep, variant = spec.partition(":")
    return f"{target}:{variant},mixer={mixer}" if sep and variant else f"{target}:mixer={mixer}"


def config_for(s: dict, mixer: str, T: int):
    """``(config, command)``: the training config of one row and the seqmix-train command
    that trains the same model."""
    from seqmix.configs import loader

    spec = with_mixer(s["config"], mixer)
    config = loader.apply_overrides(loader.load(spec), s["overrides"])
    extra = [("data.seq_len", str(T))]
    if s["tokens"]:
        extra.append(("train.batch_size", str(max(1, s["tokens"] // T))))
    loader.apply_overrides(config, extra)
    dtype = compute_dtype(config)
    config.train.compute_dtype = dtype
    items = [*s["overrides"], *extra, ("train.compute_dtype", dtype)]
    command = f"seqmix-train --config={spec} " + " ".join(f"--config.{k}={v}" for k, v in items)
    return config, command


def build(s: dict, mixer: str, T: int) -> dict:
    """The program of one row, its abstract arguments and its compiled train step."""
    from seqmix import data
    from seqmix.train import build_program

    config, command = config_for(s, mixer, T)
    task = data.make_task(config)
    program = build_program(config)
    args = program.abstract_args(task.train_batch(1))["train"]
    t0 = time.time()
    compiled = program.train_step.lower(*args).compile()
    return dict(
        config=config,
        command=command,
        task=task,
        program=program,
        compiled=compiled,
        compile_s=time.time() - t0,
    )


def _marker(mixer: str, T: int) -> str:
    from seqmix.experiments.bench import precompile

    return os.path.join(precompile.CACHE_DIR, f"bench_model_{_PRESET.value}_{mixer}_{T}")


def _compile_shard(spec: str, s: dict) -> None:
    from seqmix.experiments.bench import precompile

    precompile.setup_cache()
    jobs = [(m, t) for m in s["mixers"] for t in s["lengths"]]
    for m, t in precompile.shard(jobs, spec):
        t0 = time.time()
        try:
            build(s, m, t)
            open(_marker(m, t), "w").close()
            print(f"compiled {m} T={t} in {time.time() - t0:.0f}s", flush=True)
        except Exception as e:  # noqa: BLE001 - the timing process reports it again
            print(f"compile {m} T={t} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)


def _parallel_compile(n: int, s: dict, overrides) -> float:
    from seqmix.experiments.bench import precompile

    for m in s["mixers"]:
        for t in s["lengths"]:
            if os.path.exists(_marker(m, t)):
                os.remove(_marker(m, t))
    args = [
        f"--preset={_PRESET.value}",
        f"--mixers={','.join(s['mixers'])}",
        f"--lengths={','.join(map(str, s['lengths']))}",
        f"--compute_dtype={_DTYPE.value}",
        *([f"--config={_CONFIG.value}"] if _CONFIG.value else []),
        *([f"--tokens={_TOKENS.value}"] if _TOKENS.value is not None else []),
        *[f"--config.{k}={v}" for k, v in overrides],
    ]
    return precompile.run_workers("seqmix.experiments.bench_model", args, n, _COMPILE_BUDGET.value)


def time_one(s: dict, mixer: str, T: int, peak_tflops: float | None) -> dict:
    import jax
    import numpy as np

    from seqmix.experiments.bench import common
    from seqmix.models import layer_names
    from seqmix.train import init_state

    b = build(s, mixer, T)
    program, compiled, config = b["program"], b["compiled"], b["config"]
    state, rngs = init_state(program, on_host=True)
    batch = program.put_batch(b["task"].train_batch(1))
    holder = {"state": state}

    def step(i):
        holder["state"], metrics = compiled(holder["state"], rngs, batch, np.int32(i))
        return metrics["loss"]

    counter = iter(range(1, 10**9))
    seconds = common.time_jax(lambda: step(next(counter)), reps=3, target_s=1.0, max_n=20)
    B = config.train.batch_size
    n_params = program.num_params
    n_attn = sum(1 for name in layer_names(program.model_config) if name == "attention")
    flops_per_token = 6 * n_params + 6 * n_attn * int(config.model.d_model) * T
    tokens_per_s = B * T / seconds
    ma = compiled.memory_analysis()
    stats = jax.devices()[0].memory_stats() or {}
    row = {
        "mixer": mixer,
        "T": T,
        "batch": B,
        "compute_dtype": config.train.compute_dtype,
        "params": n_params,
        "params_m": n_params / 1e6,
        "step_ms": seconds * 1e3,
        "tokens_per_s": tokens_per_s,
        "us_per_token": 1e6 / tokens_per_s,
        "mfu": (None if not peak_tflops else flops_per_token * tokens_per_s / (peak_tflops * 1e12)),
        "compiled_gb": None
        if ma is None
        else (
            ma.argument_size_in_bytes
            + ma.output_size_in_bytes
            + ma.temp_size_in_bytes
            - ma.alias_size_in_bytes
        )
        / 2**30,
        "process_peak_gb": stats.get("peak_bytes_in_use", 0) / 2**30,
        "compile_s": b["compile_s"],
        "loss": float(step(0)),
        "command": b["command"],
    }
    return row


def add_ratios(rows: list[dict]) -> None:
    """``vs_attention``: each row's step time over attention's at the same T."""
    base = {r["T"]: r["step_ms"] for r in rows if r["mixer"] == "attention" and "step_ms" in r}
    for r in rows:
        if "step_ms" in r and r["T"] in base:
            r["vs_attention"] = r["step_ms"] / base[r["T"]]


def out_dir() -> str:
    from seqmix.configs.loader import runs_root

    return _OUT.value or os.path.join(runs_root(), "bench_model")


def plot(rows: list[dict], directory: str) -> str | None:
    """The plot of time per token against T, or None (and a note) without matplotlib."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("matplotlib is not installed: no plot (pip install 'seqmix[bench]')", flush=True)
        return None
    from seqmix.experiments.bench import common

    ok = [dict(r, impl=r["mixer"]) for r in rows if "error" not in r]
    if len({r["T"] for r in ok}) < 2:
        return None  # one length: the table says it all
    path = os.path.join(directory, f"model_{_PRESET.value}_us_per_token.png")
    common.plot_time_vs_length(
        ok, path, y="us_per_token", title=f"train step per token ({_PRESET.value})"
    )
    return path


def main(args: cli.Args):
    if len(args.argv) > 1:
        cli.fail(f"unexpected arguments: {args.argv[1:]}")
    s = settings(args.overrides)
    if _COMPILE_ONLY.value:
        _compile_shard(_COMPILE_ONLY.value, s)
        return
    import jax

    from seqmix.experiments.bench import common, precompile

    try:  # a bad config or override fails here, before anything is timed
        config_for(s, s["mixers"][0], s["lengths"][0])
    except ValueError as e:
        cli.fail(str(e))
    if _WORKERS.value > 0:
        seconds = _parallel_compile(_WORKERS.value, s, args.overrides)
        print(f"parallel compile: {seconds:.0f}s", flush=True)
    precompile.setup_cache()
    peak = _PEAK.value
    if peak is None and jax.default_backend() != "cpu":
        peak = common.matmul_ceiling()
        print(f"bf16 matmul ceiling {peak:.0f} TFLOP/s", flush=True)
    directory = out_dir()
    rows, path = [], None
    for mixer in s["mixers"]:
        for T in s["lengths"]:
            if _WORKERS.value > 0 and not os.path.exists(_marker(mixer, T)):
                row = {
                    "mixer": mixer,
                    "T": T,
                    "error": f"not compiled within --compile_budget_s={_COMPILE_BUDGET.value}",
                }
            else:
                try:
                    row = time_one(s, mixer, T, peak)
                except Exception as e:  # noqa: BLE001 - one config failing must not stop the run
                    row = {"mixer": mixer, "T": T, "error": f"{type(e).__name__}: {str(e)[:300]}"}
            rows.append(row)
            add_ratios(rows)
            print(json.dumps(row, default=float), flush=True)
            # after every row: a run cut by its time limit keeps what it measured
            path = common.write_results(
                f"model_{_PRESET.value}",
                rows,
                {"bf16_matmul_tflops": peak, "preset": _PRESET.value, **s},
                directory,
            )
    picture = plot(rows, directory)
    print(f"wrote {path}" + (f" and {picture}" if picture else ""))
    print(
        common.markdown_table(
            rows,
            [
                "mixer",
                "T",
                "batch",
                "compute_dtype",
                "params_m",
                "step_ms",
                "vs_attention",
                "tokens_per_s",
                "mfu",
                "compiled_gb",
                "error",
            ],
        )
    )


def run() -> None:
    """The ``seqmix-bench-model`` command."""
    cli.run(main, __doc__)


if __name__ == "__main__":
    run()
