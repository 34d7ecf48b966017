"""The Mosaic GPU linear-attention engine on a GPU in one call: correctness, speed, tuning.

    python -m seqmix.experiments.device.mgpu_linear_attention [--deadline_s=420] [--sections=...]

Sections, most important first (each writes its rows to $OUT/mgpu_linear_attention.json as
they come; a section that would start after ``deadline_s`` is skipped and says so):

  check_small  the op's case table (tests/kernels/linear_attention) natively on the engine:
               outputs, final states and every gradient against the float32 oracle
               (``pytest -m gpu -k pallas_mosaic_gpu`` in a subprocess, one row per case);
  check_large  the same at the benchmark shapes against the chunked XLA form in float32,
               bf16 tolerance 5e-3;
  speed        forward and forward+backward of the default Config beside pallas_triton and
               flash-linear-attention at 8 x 4096, 2 x 16384, 1 x 65536 (H 16, D 128) and
               8 x 4096 at D 64, scalar and per-channel decay;
  tune         the Config candidates of ``bench.linear_attention_mgpu`` at 8 x 4096 and
               1 x 65536 (scalar) and 8 x 4096 (per channel);
  scaling      forward at B * T = 65536, T = 4k ... 64k;
  ptxas        registers, spills and shared memory of every kernel (ptxas's report at
               8 x 4096, D 128, both decays), compiled in a subprocess.

Prints one short table last (``check`` max errors and the ms of every timed row).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import traceback
from unittest import mock

from absl import app, flags

# The command line's flags are defined when the script runs (``__main__``), so that the
# module can be imported beside other flag-defining modules.
DEFAULT_DEADLINE_S = 420.0
SECTION_ORDER = ["check_small", "check_large", "speed", "tune", "scaling", "ptxas"]


def _define_flags():
    flags.DEFINE_float(
        "deadline_s", DEFAULT_DEADLINE_S, "Start no section after this many seconds."
    )
    flags.DEFINE_list("sections", SECTION_ORDER, "Sections to run, in order.")


def _past_deadline() -> bool:
    deadline = flags.FLAGS.deadline_s if "deadline_s" in flags.FLAGS else DEFAULT_DEADLINE_S
    return time.time() - START > deadline


ROWS: list[dict] = []
START = time.time()
TOL = 5e-3
# The op's case table on the Mosaic GPU engine, natively (its bf16/fp16 cases; the others
# skip with the engine's reason).
CASES_TEST = "tests/kernels/linear_attention/test_linear_attention.py"


def _save():
    out = os.environ.get("OUT")
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "mgpu_linear_attention.json"), "w") as f:
            json.dump(ROWS, f, indent=1, default=str)


def _emit(row: dict):
    ROWS.append(row)
    print(json.dumps(row, default=str), flush=True)
    _save()


def pytest_rows(text: str) -> list[dict]:
    """One row per test of pytest's ``-rA`` summary (``PASSED``/``FAILED``/``SKIPPED``/
    ``ERROR`` lines), then one with the totals of its last line."""
    rows = []
    for line in text.splitlines():
        m = re.match(r"(PASSED|FAILED|SKIPPED|ERROR) (?:\[\d+\] )?(\S+?):?(?: - |: |$)(.*)", line)
        if m:
            status, test, why = m.groups()
            case = re.search(r"\[(.*)\]", test)
            row = {"section": "check_small", "case": case.group(1) if case else test}
            row.update(ok=status == "PASSED", status=status)
            if why:
                row["reason"] = why[:300]
            rows.append(row)
    last = text.splitlines()[-1] if text.strip() else ""
    totals = {
        word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|skipped|errors?)", last)
    }
    rows.append({"section": "check_small", "case": "totals", **totals})
    return rows


def check_small():
    """``pytest -m gpu`` on the op's case table with ``implementation="pallas_mosaic_gpu"``,
    in a subprocess (its own device memory)."""
    env = dict(os.environ, SEQMIX_TEST_DEVICE="gpu")
    args = ["-m", "pytest", "-m", "gpu", "-q", "-rA", "-p", "no:xdist", CASES_TEST]
    args += ["-k", "pallas_mosaic_gpu", "-p", "no:cacheprovider"]
    proc = subprocess.run(
        [sys.executable, *args], env=env, capture_output=True, text=True, timeout=400
    )
    yield from pytest_rows(proc.stdout.strip() or proc.stderr.strip() or "no output")
    if proc.returncode not in (0, 1):
        yield {"section": "check_small", "error": (proc.stdout + proc.stderr)[-600:]}


def _inputs(seed, B, T, H, D, decay):
    import jax
    import jax.numpy as jnp

    ks = jax.random.split(jax.random.key(seed), 5)
    q, k, v = (jax.random.normal(key, (B, T, H, D)).astype(jnp.bfloat16) for key in ks[:3])
    shape = {"scalar": (B, T, H), "channel": (B, T, H, D)}[decay]
    g = jax.random.uniform(ks[3], shape, minval=-1.0, maxval=0.0)
    s0 = jax.random.normal(ks[4], (B, H, D, D))
    return q, k, v, g, s0


def _errors(fn, ref, args):
    """Relative errors of outputs and every gradient, and whether they are all under 5e-3."""
    import jax

    from seqmix import testing

    argnums = [i for i, a in enumerate(args) if a is not None]
    outs, grads = testing.vjp_pairs(jax.jit(fn), jax.jit(ref), args, argnums=argnums, seed=1)
    names = ("q", "k", "v", "log_decay", "initial_state")
    errs = {n: testing.relative_error(a, b) for n, (a, b) in zip(("o", "final"), outs)}
    errs.update({f"d{names[i]}": testing.relative_error(a, b) for i, (a, b) in zip(argnums, grads)})
    return errs, all(e < TOL for e in errs.values())


LARGE = [
    ("scalar-8x4096-d128", 8, 4096, 16, 128, "scalar"),
    ("channel-8x4096-d128", 8, 4096, 16, 128, "channel"),
    ("scalar-1x65536-d128", 1, 65536, 16, 128, "scalar"),
    ("channel-8x4096-d64", 8, 4096, 16, 64, "channel"),
]


def check_large():
    """The public op with ``implementation="pallas_mosaic_gpu"`` at the benchmark shapes
    against the chunked XLA form in float32."""
    from seqmix.kernels import linear_attention

    for name, B, T, H, D, decay in LARGE:
        row = {"section": "check_large", "case": name}
        try:
            q, k, v, g, s0 = _inputs(0, B, T, H, D, decay)

            def make(impl):
                return lambda q, k, v, g, s0: linear_attention(
                    q, k, v, g, initial_state=s0, return_final_state=True, implementation=impl
                )

            errs, ok = _errors(make("pallas_mosaic_gpu"), make("xla"), (q, k, v, g, s0))
            row.update(errs, ok=ok, max_err=max(errs.values()))
        except Exception as e:  # noqa: BLE001
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            traceback.print_exc()
        yield row


def _bench_rows(section, shapes, *, candidates, backward=True, peers=True):
    from seqmix.experiments.bench import linear_attention_mgpu as bench

    with mock.patch.dict(os.environ, {"SEQMIX_BENCH_MGPU_CONFIGS": json.dumps(candidates)}):
        for series, B, T, H, D, decay in shapes:
            if _past_deadline():
                yield {"section": section, "error": f"skipped {B}x{T} d{D} {decay}: deadline"}
                continue
            for row in bench.measure_shape(
                series, B, T, H, D, decay, CEILINGS, backward=backward, peers=peers
            ):
                yield dict(row, section=section)


SPEED_SHAPES = [
    ("shapes", B, T, H, D, decay)
    for (B, T, H, D) in [
        (8, 4096, 16, 128),
        (2, 16384, 16, 128),
        (1, 65536, 16, 128),
        (8, 4096, 16, 64),
    ]
    for decay in ("scalar", "channel")
]
TUNE_SHAPES = [
    ("tune", 8, 4096, 16, 128, "scalar"),
    ("tune", 1, 65536, 16, 128, "scalar"),
    ("tune", 8, 4096, 16, 128, "channel"),
]
CEILINGS: dict = {}


def speed():
    yield from _bench_rows("speed", SPEED_SHAPES, candidates=[])


def tune():
    from seqmix.experiments.bench import linear_attention_mgpu as bench

    yield from _bench_rows("tune", TUNE_SHAPES, candidates=bench.CANDIDATES, peers=False)


def scaling():
    from seqmix.experiments.bench import linear_attention_mgpu as bench

    shapes = [("scaling", 65536 // T, T, 16, 128, "scalar") for T in bench.SCALING_T]
    yield from _bench_rows("scaling", shapes, candidates=[], backward=False)


PTXAS_SCRIPT = """
import jax, jax.numpy as jnp
from seqmix.kernels import linear_attention
B, T, H, D = 8, 4096, 16, 128
x = jnp.zeros((B, T, H, D), jnp.bfloat16)
for g in (jnp.zeros((B, T, H)), jnp.zeros((B, T, H, D))):
    def f(q, k, v, g):
        fn = lambda q, k, v, g: linear_attention(q, k, v, g, implementation="pallas_mosaic_gpu")
        o, vjp = jax.vjp(fn, q, k, v, g)
        return o, vjp(o)
    jax.jit(f).lower(x, x, x, g).compile()
"""


def ptxas():
    env = dict(os.environ, MOSAIC_GPU_DUMP_PTXAS="1")
    proc = subprocess.run(
        [sys.executable, "-c", PTXAS_SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    text = proc.stdout + proc.stderr
    kernel, found = None, False
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '([^']+)'", line)
        if m:
            kernel = m.group(1)
        if re.search(r"registers|spill|smem", line, re.IGNORECASE):
            found = True
            yield {"section": "ptxas", "kernel": kernel, "line": line.strip()[:200]}
    if not found:
        yield {"section": "ptxas", "error": "no ptxas report in the output: " + text[-300:]}
    if proc.returncode:
        yield {"section": "ptxas", "error": text[-600:]}


SECTIONS = {
    "check_small": check_small,
    "check_large": check_large,
    "speed": speed,
    "tune": tune,
    "scaling": scaling,
    "ptxas": ptxas,
}


def _table():
    lines = ["| section | case / impl | shape | result |", "| --- | --- | --- | --- |"]
    for r in ROWS:
        if r.get("section") == "check_small" and "status" in r:
            if r["status"] != "PASSED":  # the totals row counts the passed ones
                lines.append(
                    f"| check_small | {r['case']} | | {r['status']} {r.get('reason', '')} |"
                )
        elif r.get("section") == "check_small" and r.get("case") == "totals":
            counts = ", ".join(f"{n} {k}" for k, n in r.items() if k not in ("section", "case"))
            lines.append(f"| check_small | totals | | {counts} |")
        elif r.get("section") in ("check_small", "check_large"):
            res = (
                r.get("error")
                or f"{'ok' if r.get('ok') else 'FAIL'} max_err {r.get('max_err', 0):.2e}"
            )
            lines.append(f"| {r['section']} | {r.get('case')} | | {res} |")
        elif "impl" in r:
            shape = f"{r['decay']} {r['B']}x{r['T']} d{r['D']}"
            res = r.get("error") or (
                f"fwd {r.get('fwd_ms', float('nan')):.3f} ms"
                + (f", fwd+bwd {r['fwdbwd_ms']:.3f} ms" if r.get("fwdbwd_ms") else "")
            )
            lines.append(
                f"| {r['section']} | {r['impl']} {r.get('plan') or ''} | {shape} | {res} |"
            )
        elif r.get("section") == "ptxas" and "spill" in r.get("line", "").lower():
            lines.append(f"| ptxas | {r.get('kernel')} | | {r['line']} |")
        elif "error" in r:
            lines.append(f"| {r['section']} | | | {r['error']} |")
    return "\n".join(lines)


def main(argv):
    del argv
    from seqmix.experiments.bench import common

    CEILINGS.update(copy_tbps=common.copy_ceiling())
    _emit({"section": "env", **common.environment(), **CEILINGS})
    for name in flags.FLAGS.sections:
        if _past_deadline():
            _emit({"section": name, "error": "skipped: past the deadline"})
            continue
        t0 = time.time()
        try:
            for row in SECTIONS[name]():
                _emit(row)
        except Exception as e:  # noqa: BLE001 - one section failing must not stop the others
            _emit({"section": name, "error": f"{type(e).__name__}: {str(e)[:400]}"})
            traceback.print_exc()
        print(f"section {name}: {time.time() - t0:.0f}s", flush=True)
    print(_table(), flush=True)


if __name__ == "__main__":
    _define_flags()
    app.run(main)
