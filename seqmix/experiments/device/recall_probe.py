"""Where a recall-sweep step spends its time, in one short run on a GPU machine.

    python -m seqmix.experiments.device.recall_probe [--probe_mixers=attention,mamba2]

A recall sweep of small models (2 layers, d_model 256) with several jobs sharing the GPU can
run far slower per step than its FLOP count predicts. This probe times, for each mixer at
one setting, with every call blocked on:

- ``single``: the training step of one learning rate (what each sweep job runs);
- ``eval``: its evaluation step (forward only);
- ``host``: the host's batch (generation and transfer);
- ``vmapped`` (with ``--probe_vmapped``): one step of two learning rates vmapped over the
  state, the form that trains several rates at once;

then traces three single-rate steps with ``jax.profiler`` and prints the 20 device ops that
take the most time (summed over the trace), and writes the optimized HLO of that step to
``$OUT``. A table of the timings comes last.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import shutil
import time

from absl import app, flags

from seqmix.experiments import recall_sweep  # its flags (one definition per process)

_MIXERS = flags.DEFINE_list(
    "probe_mixers",
    ["attention"],
    "Mixers to probe (each compiles four programs: ~1-2 minutes on the H200).",
)
_D_MODEL = flags.DEFINE_integer("probe_d_model", 256, "Width.")
_SETTING = flags.DEFINE_string("probe_setting", "256:16", "seq_len:pairs.")
_BATCH = flags.DEFINE_integer("probe_batch_size", 256, "Sequences per step.")
_STEPS = flags.DEFINE_integer("probe_steps", 10, "Timed steps per variant.")
_TRACE = flags.DEFINE_bool("trace", True, "Profile three steps and list the top device ops.")
_VMAPPED = flags.DEFINE_bool(
    "probe_vmapped", False, "Also time two learning rates vmapped (one more compilation)."
)


def _timed(fn, n):
    """Median seconds of ``n`` blocked calls of ``fn`` (after one untimed call)."""
    import jax

    jax.block_until_ready(fn())
    times = []
    for _ in range(n):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


# kinds of device ops by name: matmul libraries, cuDNN, XLA's fusions and copies; the
# rest are custom kernels (seqmix's Pallas kernels carry their op's name)
_KINDS = (
    ("matmul", ("nvjet", "xmma", "cutlass", "cublas", "gemm")),
    ("cudnn", ("cudnn",)),
    ("memcpy", ("memcpy", "memset")),
    ("xla fusion", ("fusion", "loop_", "input_", "wrapped_", "copy", "transpose", "slice")),
)


def op_kind(name: str) -> str:
    """``matmul``, ``cudnn``, ``memcpy``, ``xla fusion`` or ``kernel`` (anything else: the
    custom calls, seqmix's Pallas kernels among them)."""
    low = name.lower()
    for kind, needles in _KINDS:
        if any(n in low for n in needles):
            return kind
    return "kernel"


def by_kind(ops: list[tuple[str, float, int]]) -> dict[str, list[float]]:
    """``kind -> [total ms, count]`` over every op of ``ops`` (``op_kind``), largest first."""
    kinds: dict[str, list[float]] = {}
    for name, ms, n in ops:
        entry = kinds.setdefault(op_kind(name), [0.0, 0])
        entry[0] += ms
        entry[1] += n
    return dict(sorted(kinds.items(), key=lambda kv: -kv[1][0]))


def top_ops(trace_dir: str, k: int | None = 20) -> list[tuple[str, float, int]]:
    """``(name, total ms, count)`` of the ``k`` longest-running event names (None: all) of
    the perfetto trace under ``trace_dir``, from the device's threads (names of host Python
    frames and threads are left out where the trace marks them)."""
    files = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
    files += glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
    if not files:
        return []
    with gzip.open(sorted(files)[-1], "rt") as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    names = {
        e.get("pid"): e.get("args", {}).get("name", "")
        for e in events
        if e.get("ph") == "M" and e.get("name") == "process_name"
    }
    device_pids = {
        pid
        for pid, name in names.items()
        if any(s in str(name).lower() for s in ("gpu", "device", "stream", "/device"))
    }
    total, count = collections.defaultdict(float), collections.Counter()
    for e in events:
        if e.get("ph") != "X" or "dur" not in e:
            continue
        if device_pids and e.get("pid") not in device_pids:
            continue
        total[e["name"]] += e["dur"] / 1e3
        count[e["name"]] += 1
    ranked = sorted(total, key=total.get, reverse=True)
    return [(n, total[n], count[n]) for n in (ranked if k is None else ranked[:k])]


def probe(
    mixer: str,
    d_model: int,
    seq_len: int,
    pairs: int,
    batch_size: int,
    steps: int,
    out: str | None,
    trace: bool,
    vmapped: bool = False,
) -> dict:
    import jax
    import jax.numpy as jnp

    row = dict(mixer=mixer, d_model=d_model, seq_len=seq_len, pairs=pairs, batch=batch_size)
    lrs = (3e-3, 1e-2)
    args = (mixer, d_model, seq_len, pairs)
    b = recall_sweep.probe_programs(*args, lrs[:1], 4000, batch_size, 0, vmap=False)
    task = b["task"]
    t = time.perf_counter()
    train, evaluate = recall_sweep.compile_job(b)
    row["compile_s"] = time.perf_counter() - t
    state, rngs = b["init"]()
    row["state_devices"] = sorted({str(d) for x in jax.tree.leaves(state) for d in x.devices()})
    batch = {k: jnp.asarray(v) for k, v in task.train_batch(1).items()}
    step = jnp.asarray(1, jnp.int32)
    row["host_ms"] = 1e3 * _timed(
        lambda: {k: jnp.asarray(v) for k, v in task.train_batch(2).items()}, steps
    )

    holder = {"state": state}

    def single():
        holder["state"], m = train(holder["state"], rngs, batch, step)
        return m

    row["single_ms"] = 1e3 * _timed(single, steps)
    ev = {k: jnp.asarray(v) for k, v in task.eval_batches()[0].items()}
    s = holder["state"]
    row["eval_ms"] = 1e3 * _timed(lambda: evaluate(s.params, rngs, s.other, ev), steps)

    if vmapped:  # every rate of lrs in one step
        bv = recall_sweep.probe_programs(*args, lrs, 4000, batch_size, 0, vmap=True)
        train_v, _ = recall_sweep.compile_job(bv)
        holder["v"] = bv["init"]()[0]

        def both():
            holder["v"], m = train_v(holder["v"], rngs, batch, step)
            return m

        row["vmapped_ms"] = 1e3 * _timed(both, steps)

    if out:
        name = f"{mixer}_d{d_model}_{seq_len}_{pairs}"
        with open(os.path.join(out, f"hlo_{name}.txt"), "w") as f:
            f.write(train.as_text())
        if trace:
            tdir = os.path.join(out, f"trace_{name}")
            with jax.profiler.trace(tdir, create_perfetto_trace=True):
                for _ in range(3):
                    jax.block_until_ready(single())
            every = top_ops(tdir, None)
            shutil.rmtree(tdir, ignore_errors=True)  # MBs; what came back is the summary
            ops = every[:20]
            row["top_ops"] = ops
            row["ops_by_kind"] = by_kind(every)
            # device-busy time per step against the step's wall time: the rest is idle
            # (launches, host work) where the step is not device-bound
            row["device_ms_per_step"] = sum(ms for _, ms, _ in every) / 3
            print(f"top device ops of 3 single-rate steps, {name}:", flush=True)
            for n, ms, c in ops:
                print(f"  {ms:9.2f} ms {c:6d}x  {n[:100]}", flush=True)
            print(
                f"GPU kernel time per step {row['device_ms_per_step']:.2f} ms of "
                f"{row['single_ms']:.2f} ms; by kind (3 steps): "
                + ", ".join(f"{k} {ms:.2f} ms / {n}x" for k, (ms, n) in row["ops_by_kind"].items()),
                flush=True,
            )
    print(json.dumps(row, default=str), flush=True)
    return row


def main(argv):
    del argv
    from seqmix.experiments.bench import precompile

    precompile.setup_cache()  # a later sweep stage of the same run starts from its hits
    seq_len, pairs = (int(x) for x in _SETTING.value.split(":"))
    out = os.environ.get("OUT")
    rows = []
    for mixer in _MIXERS.value:
        rows.append(
            probe(
                mixer,
                _D_MODEL.value,
                seq_len,
                pairs,
                _BATCH.value,
                _STEPS.value,
                out,
                _TRACE.value,
                _VMAPPED.value,
            )
        )
        if out:
            with open(os.path.join(out, "recall_probe.json"), "w") as f:
                json.dump(rows, f, indent=1, default=str)
    print(
        "| mixer | compile s | host ms | single rate ms | device-busy ms | eval ms "
        "| vmapped (2 rates) ms |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        vm = f"{r['vmapped_ms']:.2f}" if "vmapped_ms" in r else "–"
        busy = f"{r['device_ms_per_step']:.2f}" if "device_ms_per_step" in r else "–"
        print(
            f"| {r['mixer']} | {r['compile_s']:.1f} | {r['host_ms']:.2f} | "
            f"{r['single_ms']:.2f} | {busy} | {r['eval_ms']:.2f} | {vm} |"
        )


if __name__ == "__main__":
    app.run(main)
