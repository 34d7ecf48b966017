"""Sequence (context) parallelism measured: scaling over GPUs, long layers, per-device
overhead, and the memory of a 1M-token step.

    python -m seqmix.experiments.bench_sequence_parallel --mode=scaling     # n GPUs
    python -m seqmix.experiments.bench_sequence_parallel --mode=layer       # n GPUs
    python -m seqmix.experiments.bench_sequence_parallel --mode=overhead    # one GPU
    python -m seqmix.experiments.bench_sequence_parallel --mode=memory      # the CPU

- ``scaling``: one training step (the trainer's, AdamW, bf16 compute) of the ~125M models of
  ``bench_model`` (``--mixers``: attention, mamba2, gla, hybrid) with ``T = tokens_per_gpu x
  n`` on all ``n`` devices (``mesh.seq = n``), against ``T = tokens_per_gpu`` on one device
  (``mesh.seq = 1``). Rows: tokens/s, tokens/s per GPU, MFU (6 N per token plus causal
  attention's 6 L d T, against the bf16 matmul ceiling measured in the same run), step time,
  the time spent in collectives from a profile of ``--profile_steps`` steps (collective ops
  and NCCL kernels on the first device; overlapped time counts), XLA's memory account per
  device, and the scaling efficiency ``tokens/s(n) / (n x tokens/s(1))``.
- ``layer``: forward and backward of one block (mixer + MLP) over all devices for each of
  ``--layer_lengths`` (total tokens, ascending, stopping at the first that does not fit),
  with XLA's account of its memory per device and the allocator's peak.
- ``overhead``: on one device, forward + backward of each op's context-parallel per-device
  program (the code every device runs at ``seq > 1``: halos, the all-gathered states and the
  correction, the zig-zag schedule; on a ``seq`` axis of one device its collectives move
  nothing) against the plain op, at ``--overhead_tokens`` tokens with the 125M models'
  shapes; ``overhead = time(context-parallel) / time(op) - 1``.
- ``memory``: on the CPU, XLA's memory account per device of the compiled training step
  (as the models are, and with every block rematerialised: ``train_step_remat``), of one
  layer, and of the LM head with its loss (``head_and_loss``) at ``--memory_tokens`` tokens on ``--memory_seq`` simulated devices (abstract
  inputs: nothing is allocated); ``--implementation=pallas_triton`` accounts the GPU
  kernels' buffers (interpret mode). The figures in docs/sequence_parallel.md.

JSON rows go to ``benchmarks/results/sequence_parallel_<mode>_<date>.json`` (and $OUT).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time

from absl import app, flags

_MODE = flags.DEFINE_enum("mode", "scaling", ["scaling", "layer", "overhead", "memory"], "What.")
_MIXERS = flags.DEFINE_list("mixers", ["attention", "mamba2", "gla", "hybrid"], "Mixers.")
_TOKENS_PER_GPU = flags.DEFINE_integer("tokens_per_gpu", 32768, "scaling: tokens per device.")
_LAYER_LENGTHS = flags.DEFINE_list(
    "layer_lengths",
    ["131072", "262144", "524288", "1048576", "2097152"],
    "layer: total sequence lengths, ascending.",
)
_OVERHEAD_TOKENS = flags.DEFINE_integer("overhead_tokens", 32768, "overhead: tokens.")
_OVERHEAD_OPS = flags.DEFINE_list(
    "overhead_ops",
    [],
    "overhead: ops to time (default all: attention, attention_lse, attention_window_64, gla, "
    "mamba2_ssd, conv1d, selective_scan, gated_delta_rule).",
)
_MEMORY_TOKENS = flags.DEFINE_integer("memory_tokens", 1 << 20, "memory: sequence length.")
_MEMORY_SEQ = flags.DEFINE_integer("memory_seq", 8, "memory: simulated devices (mesh.seq).")
_IMPLEMENTATION = flags.DEFINE_string(
    "implementation",
    None,
    "The kernels' implementation= (default: auto). memory: pallas_triton (in interpret mode "
    "on the CPU) accounts the GPU kernels' buffers, xla the XLA forms'.",
)
_LAYERS = flags.DEFINE_integer("layers", 12, "Layers.")
_D_MODEL = flags.DEFINE_integer("d_model", 768, "Model width.")
_VOCAB = flags.DEFINE_integer("vocab", 32768, "Vocabulary size.")
_PROFILE_STEPS = flags.DEFINE_integer("profile_steps", 3, "scaling: profiled steps (0: none).")
_PEAK = flags.DEFINE_float(
    "peak_tflops", None, "bf16 matmul ceiling for MFU (default: measured in this run)."
)
_OUT = flags.DEFINE_string("out_dir", None, "Results folder (default benchmarks/results).")


def _time_steps(compiled, state, rngs, batch):
    """(seconds per step, final state): the common timing protocol over successive steps."""
    import jax

    from seqmix.experiments.bench import common

    holder = {"state": state}
    counter = iter(range(1, 10**9))

    def step():
        holder["state"], metrics = compiled(
            holder["state"], rngs, batch, jax.numpy.asarray(next(counter), "int32")
        )
        return metrics["loss"]

    seconds = common.time_jax(step, reps=3, target_s=1.0, max_n=20)
    return seconds, holder, step


def run_scaling(peak: float) -> list[dict]:
    import jax

    from seqmix.experiments.bench import sequence_parallel as sp

    n = len(jax.devices())
    rows, single = [], {}
    for mixer in _MIXERS.value:
        for seq in sorted({1, n}):
            T = _TOKENS_PER_GPU.value * seq
            row = {"mixer": mixer, "seq": seq, "T": T}
            try:
                step = sp.TrainStep(
                    mixer,
                    T,
                    sp.mesh_of(seq),
                    layers=_LAYERS.value,
                    d_model=_D_MODEL.value,
                    vocab=_VOCAB.value,
                    implementation=_IMPLEMENTATION.value,
                )
                t0 = time.time()
                compiled = step.compile()
                row["compile_s"] = time.time() - t0
                row.update(sp.memory_gb(compiled))
                seconds, _, one_step = _time_steps(compiled, *step.concrete(_VOCAB.value))
                tps = T / seconds
                row.update(
                    step_ms=seconds * 1e3,
                    tokens_per_s=tps,
                    tokens_per_s_per_gpu=tps / seq,
                    mfu=step.flops_per_token() * tps / (seq * peak * 1e12),
                    params_m=step.n_params / 1e6,
                )
                if _PROFILE_STEPS.value:
                    with tempfile.TemporaryDirectory() as d:
                        jax.profiler.start_trace(d, create_perfetto_trace=True)
                        for _ in range(_PROFILE_STEPS.value):
                            loss = one_step()
                        jax.block_until_ready(loss)
                        jax.profiler.stop_trace()
                        prof = sp.collective_seconds(d)
                    if prof["collective_s"] is not None:
                        per_step = prof["collective_s"] / _PROFILE_STEPS.value
                        row["collective_ms"] = per_step * 1e3
                        row["collective_share"] = per_step / seconds
                if seq == 1:
                    single[mixer] = tps
                elif mixer in single:
                    row["scaling_efficiency"] = tps / (seq * single[mixer])
            except Exception as e:  # noqa: BLE001 - one configuration failing must not stop the run
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            print(json.dumps(row, default=float), flush=True)
            rows.append(row)
    return rows


def run_layer() -> list[dict]:
    import jax

    from seqmix.experiments.bench import common
    from seqmix.experiments.bench import sequence_parallel as sp

    n = len(jax.devices())
    mesh = sp.mesh_of(n)
    rows = []
    for mixer in _MIXERS.value:
        if mixer == "hybrid":  # a model pattern, not a layer: its layers are mamba2 and attention
            continue
        for T in sorted(int(t) for t in _LAYER_LENGTHS.value):
            row = {"mixer": mixer, "seq": n, "T": T}
            try:
                fn, abstract = sp.layer_step(
                    mixer, T, mesh, d_model=_D_MODEL.value, implementation=_IMPLEMENTATION.value
                )
                with jax.set_mesh(mesh):
                    compiled = fn.lower(*abstract).compile()
                row.update(sp.memory_gb(compiled))
                args = sp.concrete_like(abstract)
                row["fwd_bwd_ms"] = common.time_jax(compiled, *args, reps=3, max_n=5) * 1e3
                stats = [d.memory_stats() or {} for d in jax.devices()[:n]]
                row["peak_gb_per_device"] = (
                    max(s.get("peak_bytes_in_use", 0) for s in stats) / 2**30
                )
                del args
            except Exception as e:  # noqa: BLE001 - the first length that does not fit ends the sweep
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            print(json.dumps(row, default=float), flush=True)
            rows.append(row)
            if "error" in row:
                break
    return rows


def run_overhead() -> list[dict]:
    import jax

    from seqmix.experiments.bench import common
    from seqmix.experiments.bench import sequence_parallel as sp

    rows = []
    cases = sp.overhead_cases(_OVERHEAD_TOKENS.value, _D_MODEL.value)
    unknown = sorted(set(_OVERHEAD_OPS.value) - set(cases))
    if unknown:
        raise ValueError(f"--overhead_ops: unknown {unknown}; known: {sorted(cases)}")
    for name, (op, local, args) in cases.items():
        if _OVERHEAD_OPS.value and name not in _OVERHEAD_OPS.value:
            continue
        row = {"op": name, "T": _OVERHEAD_TOKENS.value, "device": str(jax.devices()[0].device_kind)}
        try:
            per_device = sp.on_one_device_axis(local, args)
            f_op, f_cp = sp.forward_backward(op, args), sp.forward_backward(per_device, args)
            fw_op, fw_cp = jax.jit(op), jax.jit(per_device)
            row["err"] = common.rel_err(fw_cp(*args), fw_op(*args))
            row["fwd_op_ms"] = common.time_jax(fw_op, *args) * 1e3
            row["fwd_cp_ms"] = common.time_jax(fw_cp, *args) * 1e3
            row["fwd_bwd_op_ms"] = common.time_jax(f_op, *args) * 1e3
            row["fwd_bwd_cp_ms"] = common.time_jax(f_cp, *args) * 1e3
            row["fwd_overhead"] = row["fwd_cp_ms"] / row["fwd_op_ms"] - 1
            row["fwd_bwd_overhead"] = row["fwd_bwd_cp_ms"] / row["fwd_bwd_op_ms"] - 1
        except Exception as e:  # noqa: BLE001
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        print(json.dumps(row, default=float), flush=True)
        rows.append(row)
    return rows


def run_memory() -> list[dict]:
    import jax

    from seqmix.experiments.bench import sequence_parallel as sp

    seq, T = _MEMORY_SEQ.value, _MEMORY_TOKENS.value
    if len(jax.devices()) < seq:
        raise ValueError(f"--memory_seq={seq} needs {seq} devices, found {len(jax.devices())}")
    mesh = sp.mesh_of(seq)
    rows = []
    for mixer in _MIXERS.value:
        for what in ("train_step", "train_step_remat", "one_layer", "head_and_loss"):
            if what == "head_and_loss" and mixer != _MIXERS.value[0]:
                continue  # the same for every mixer
            if what == "one_layer" and mixer == "hybrid":
                continue
            row = {"mixer": mixer, "what": what, "T": T, "seq": seq, "tokens_per_device": T // seq}
            row["implementation"] = _IMPLEMENTATION.value or "auto"
            t0 = time.time()
            try:
                if what.startswith("train_step"):
                    remat = what == "train_step_remat"
                    context = sp.rematerialised_blocks() if remat else contextlib.nullcontext()
                    with context:
                        step = sp.TrainStep(
                            mixer,
                            T,
                            mesh,
                            layers=_LAYERS.value,
                            d_model=_D_MODEL.value,
                            vocab=_VOCAB.value,
                            implementation=_IMPLEMENTATION.value,
                        )
                        compiled = step.compile()
                    row["params_m"] = step.n_params / 1e6
                else:
                    if what == "one_layer":
                        fn, abstract = sp.layer_step(
                            mixer,
                            T,
                            mesh,
                            d_model=_D_MODEL.value,
                            implementation=_IMPLEMENTATION.value,
                        )
                    else:
                        fn, abstract = sp.head_step(
                            T, mesh, d_model=_D_MODEL.value, vocab=_VOCAB.value
                        )
                    with jax.set_mesh(mesh):
                        compiled = fn.lower(*abstract).compile()
                row.update(sp.memory_gb(compiled))
            except Exception as e:  # noqa: BLE001
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            row["compile_s"] = time.time() - t0
            print(json.dumps(row, default=float), flush=True)
            rows.append(row)
    return rows


def main(argv):
    del argv
    mode = _MODE.value
    if mode == "memory":  # simulated CPU devices: set before JAX starts
        os.environ["JAX_PLATFORMS"] = "cpu"
        os.environ["SEQMIX_INTERPRET"] = "1"  # Pallas kernels (when asked for) lower on the CPU
        count = f"--xla_force_host_platform_device_count={_MEMORY_SEQ.value}"
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + count).strip()
    from seqmix.experiments.bench import common

    ceilings = {}
    if mode == "scaling":
        ceilings["bf16_matmul_tflops"] = _PEAK.value or common.matmul_ceiling()
        print(f"bf16 matmul ceiling {ceilings['bf16_matmul_tflops']:.0f} TFLOP/s", flush=True)
        rows = run_scaling(ceilings["bf16_matmul_tflops"])
        columns = ["mixer", "seq", "T", "step_ms", "tokens_per_s", "tokens_per_s_per_gpu", "mfu"]
        columns += ["collective_ms", "collective_share", "scaling_efficiency", "total_gb", "error"]
    elif mode == "layer":
        rows = run_layer()
        columns = ["mixer", "seq", "T", "fwd_bwd_ms", "total_gb", "peak_gb_per_device", "error"]
    elif mode == "overhead":
        rows = run_overhead()
        columns = ["op", "T", "fwd_op_ms", "fwd_cp_ms", "fwd_overhead", "fwd_bwd_op_ms"]
        columns += ["fwd_bwd_cp_ms", "fwd_bwd_overhead", "err", "error"]
    else:
        rows = run_memory()
        columns = ["mixer", "what", "T", "seq", "arguments_gb", "temp_gb", "total_gb", "error"]
    path = common.write_results(f"sequence_parallel_{mode}", rows, ceilings, _OUT.value)
    print(f"wrote {path}")
    print(common.markdown_table(rows, columns))


if __name__ == "__main__":
    app.run(main)
