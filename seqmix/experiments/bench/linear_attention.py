"""Chunked gated linear attention: seqmix pallas_triton and xla beside flash-linear-attention.

    python -m seqmix.experiments.bench_kernels --op=linear_attention [--quick]
    python -m seqmix.experiments.bench_kernels --op=linear_attention --tune --tuning_out=t.json

Rows ("series" = "shapes"): [B, T, H, D] in ``SHAPES``, bf16, scalar decay (Mamba-2 SSD /
simple GLA; peer ``fla.ops.simple_gla.chunk_simple_gla``) and per-channel decay (GLA; peer
``fla.ops.gla.chunk_gla``), forward and forward+backward. Log decays are realistic:
``log_sigmoid(N(0, 1)) / 16`` (flash-linear-attention's GLA gate normaliser), float32.

Per row: ms, bytes moved against the copy ceiling (q, k, v, g read once and o written once),
tokens/s, the relative error of the output against seqmix xla on the same inputs and, for
seqmix pallas_triton, against flash-linear-attention's output (an independent check).
flash-linear-attention's backward refuses to run on Hopper with Triton 3.6: its row records
the error it raises.

Variants: ``SEQMIX_BENCH_LA_CONFIGS='[{"split_scores": false}, {"block_v": 128}]'`` (a JSON
list of ``seqmix.kernels.linear_attention.tuning.TritonConfig`` fields, ``num_warps`` as a
``PerKernel`` object; a ``chunk_size`` entry is passed as the chunk size) adds one
pallas_triton row per entry, the public op called with that ``config=``. Unset,
``DEFAULT_CONFIGS`` are timed (the single-pass state, FLA's tiling); ``'[]'`` times none.
Every pallas_triton row records its relative error against flash-linear-attention's output.
``--tune`` runs the autotuner (``seqmix.kernels.tune``) over ``tuning.SEARCH`` at
``[8, 4096, 16, 128]`` for the scalar and per-channel decays.

Rows ("series" = "scaling"): B * T = 65536 tokens at T = 4k ... 64k, H = 16, D = 128, scalar
decay, forward: time per token should be flat; a log-log plot of time against T is written
next to the JSON (``linear_attention_scaling.png``).
"""

from __future__ import annotations

import inspect
import json
import os
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from seqmix.experiments.bench import common
from seqmix.kernels import linear_attention
from seqmix.kernels import tune as kernel_tune
from seqmix.kernels.linear_attention import tuning

SHAPES = [(8, 4096, 16, 128), (2, 16384, 16, 128), (1, 65536, 16, 128), (8, 4096, 16, 64)]
QUICK_SHAPES = [(2, 4096, 16, 128)]
SCALING_T = [4096, 8192, 16384, 32768, 65536]
QUICK_SCALING_T = [4096, 16384]
SCALING_TOKENS = 65536
# Variants timed beside the default (the two-level state pass, "auto"): the single-level
# state pass; FLA's output tiling (one value block of 128, 8 warps, score matmuls in one bf16
# part).
DEFAULT_CONFIGS = [
    {"state_segments": 1},
    {"block_v": 128, "split_scores": False, "num_warps": {"output": 8, "dv": 8, "dqk": 8}},
]
FLA_OPS = {
    "scalar": ("fla.ops.simple_gla", "chunk_simple_gla"),
    "channel": ("fla.ops.gla", "chunk_gla"),
}

COLUMNS = [
    "series",
    "decay",
    "impl",
    "config",
    "B",
    "T",
    "H",
    "D",
    "fwd_ms",
    "fwdbwd_ms",
    "fwd_TBps",
    "copy_frac",
    "Mtok_per_s",
    "ns_per_token",
    "fwd_mem_mb",
    "fwdbwd_speedup_vs_xla",
    "rel_err_xla",
    "rel_err_fla",
    "error",
]


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]


def _inputs(B, T, H, D, decay, seed=0):
    ks = jax.random.split(jax.random.key(seed), 5)
    q = jax.random.normal(ks[0], (B, T, H, D), jnp.bfloat16)
    k = jax.random.normal(ks[1], (B, T, H, D), jnp.bfloat16)
    v = jax.random.normal(ks[2], (B, T, H, D), jnp.bfloat16)
    shape = (B, T, H) if decay == "scalar" else (B, T, H, D)
    g = jax.nn.log_sigmoid(jax.random.normal(ks[3], shape, jnp.float32)) / 16
    do = jax.random.normal(ks[4], (B, T, H, D), jnp.bfloat16)
    return q, k, v, g, do


def _bytes(B, T, H, D, decay):
    act = 4 * B * T * H * D * 2  # q, k, v read, o written (bf16)
    return act + B * T * H * (1 if decay == "scalar" else D) * 4


def _configs() -> list[dict]:
    env = os.environ.get("SEQMIX_BENCH_LA_CONFIGS")
    return DEFAULT_CONFIGS if env is None else json.loads(env)


def _split_chunk(entry: dict) -> tuple[int, tuning.TritonConfig]:
    """(chunk size, TritonConfig) of one bench config entry."""
    entry = dict(entry)
    chunk = entry.pop("chunk_size", 64)
    return chunk, kernel_tune.from_dict(tuning.TritonConfig, entry, where="SEQMIX_BENCH_LA_CONFIGS")


def _seqmix_fns(impl, entry=None):
    def fwd(q, k, v, g):
        if entry is not None:  # the Triton backend with a tuning Config
            chunk, config = _split_chunk(entry)
            return linear_attention(
                q, k, v, g, chunk_size=chunk, implementation="pallas_triton", config=config
            )
        return linear_attention(q, k, v, g, implementation=impl)

    def fwd_bwd(q, k, v, g, do):
        o, vjp = jax.vjp(fwd, q, k, v, g)
        return o, vjp(do)

    return jax.jit(fwd), jax.jit(fwd_bwd)


def _fla(decay, q, k, v, g, do):
    """(forward callable, forward+backward callable, output) of flash-linear-attention on
    the same inputs (torch tensors shared through DLPack, layout [B, T, H, D])."""
    import importlib

    import torch

    module, name = FLA_OPS[decay]
    fn = getattr(importlib.import_module(module), name)
    kw = {"head_first": False} if "head_first" in inspect.signature(fn).parameters else {}

    def to_torch(x):
        try:
            return torch.from_dlpack(x)
        except Exception:  # noqa: BLE001 - fall back to a host copy
            return (
                torch.tensor(np.asarray(x.astype(jnp.float32)))
                .cuda()
                .to(torch.bfloat16 if x.dtype == jnp.bfloat16 else torch.float32)
            )

    jax.block_until_ready((q, k, v, g, do))
    tq, tk, tv, tg, tdo = (to_torch(x) for x in (q, k, v, g, do))
    scale = q.shape[-1] ** -0.5

    def forward():
        return fn(q=tq, k=tk, v=tv, g=tg, scale=scale, output_final_state=False, **kw)[0]

    leaves = [t.detach().clone().requires_grad_(True) for t in (tq, tk, tv, tg)]

    def forward_backward():
        o = fn(
            q=leaves[0],
            k=leaves[1],
            v=leaves[2],
            g=leaves[3],
            scale=scale,
            output_final_state=False,
            **kw,
        )[0]
        return torch.autograd.grad(o, leaves, tdo)

    with torch.no_grad():
        out = forward()
    return forward, forward_backward, np.asarray(out.float().cpu().numpy())


def _torch_peak_mb(fn) -> float | None:
    """Peak PyTorch allocation of one ``fn()`` (its inputs included), MB."""
    try:
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20
    except Exception:  # noqa: BLE001 - memory is optional
        return None


def _row(series, decay, impl, B, T, H, D):
    return {"series": series, "decay": decay, "impl": impl, "B": B, "T": T, "H": H, "D": D}


def _fill_speed(row, ms, nbytes, ceilings, tokens):
    row["fwd_ms"] = ms
    row["fwd_TBps"] = nbytes / (ms * 1e-3) / 1e12
    if ceilings.get("copy_tbps"):
        row["copy_frac"] = row["fwd_TBps"] / ceilings["copy_tbps"]
    row["Mtok_per_s"] = tokens / (ms * 1e-3) / 1e6
    row["ns_per_token"] = ms * 1e6 / tokens


def _measure_shape(series, B, T, H, D, decay, ceilings, *, backward=True, with_xla=True):
    rows = common.new_rows()
    q, k, v, g, do = _inputs(B, T, H, D, decay)
    nbytes, tokens = _bytes(B, T, H, D, decay), B * T
    outs = {}
    impls = ["pallas_triton"] + (["xla"] if with_xla else [])
    impls += [json.dumps(c, sort_keys=True) for c in _configs()]
    for impl in impls:
        config = json.loads(impl) if impl.startswith("{") else None
        name = f"seqmix_pallas_triton{impl}" if config is not None else f"seqmix_{impl}"
        row = _row(series, decay, name, B, T, H, D)
        try:
            if config is not None:
                row["config"] = json.dumps(config, sort_keys=True)
            fwd, fwd_bwd = _seqmix_fns(impl, config)
            outs[impl] = fwd(q, k, v, g)
            _fill_speed(row, common.time_jax(fwd, q, k, v, g) * 1e3, nbytes, ceilings, tokens)
            mem = common.compiled_bytes(fwd, q, k, v, g)
            row["fwd_mem_mb"] = None if mem is None else mem / 2**20
            if backward:
                row["fwdbwd_ms"] = common.time_jax(fwd_bwd, q, k, v, g, do) * 1e3
        except Exception as e:  # noqa: BLE001 - one failure must not stop the run
            row["error"] = _error(e)
            traceback.print_exc()
        rows.append(row)
    fla_row = _row(series, decay, f"fla_{FLA_OPS[decay][1]}", B, T, H, D)
    try:
        forward, forward_backward, outs["fla"] = _fla(decay, q, k, v, g, do)
        _fill_speed(fla_row, common.time_torch(forward) * 1e3, nbytes, ceilings, tokens)
        fla_row["fwd_mem_mb"] = _torch_peak_mb(forward)
        if backward:
            try:
                fla_row["fwdbwd_ms"] = common.time_torch(forward_backward) * 1e3
            except Exception as e:  # noqa: BLE001 - refuses on Hopper
                fla_row["error"] = "backward: " + _error(e)
    except Exception as e:  # noqa: BLE001
        fla_row["error"] = _error(e)
    rows.append(fla_row)
    # Accuracy on the same inputs.
    keys = [*impls, "fla"]
    for row, key in zip(rows, keys):
        if key in outs and "xla" in outs:
            row["rel_err_xla"] = common.rel_err(outs[key], outs["xla"])
    for row, key in zip(rows, keys):
        if key not in ("xla", "fla") and key in outs and "fla" in outs:
            row["rel_err_fla"] = common.rel_err(outs[key], outs["fla"])
    xla_bwd = next((r.get("fwdbwd_ms") for r in rows if r["impl"] == "seqmix_xla"), None)
    for row in rows:
        if xla_bwd and row.get("fwdbwd_ms"):
            row["fwdbwd_speedup_vs_xla"] = xla_bwd / row["fwdbwd_ms"]
    del q, k, v, g, do, outs
    return rows


def run(quick: bool = False, ceilings: dict | None = None):
    """Benchmark rows and the table's columns (see the module docstring)."""
    ceilings = ceilings or {}
    rows = []  # the per-shape lists are the registered ones (common.new_rows)
    for B, T, H, D in QUICK_SHAPES if quick else SHAPES:
        for decay in ("scalar", "channel"):
            shape_rows = _measure_shape("shapes", B, T, H, D, decay, ceilings)
            rows += shape_rows
            print(common.markdown_table(shape_rows, COLUMNS), flush=True)
    scaling = []
    for T in QUICK_SCALING_T if quick else SCALING_T:
        B = SCALING_TOKENS // T
        shape_rows = _measure_shape(
            "scaling", B, T, 16, 128, "scalar", ceilings, backward=False, with_xla=False
        )
        scaling += shape_rows
        print(common.markdown_table(shape_rows, COLUMNS), flush=True)
    rows += scaling
    for d in filter(None, [common.RESULTS_DIR, os.environ.get("OUT")]):
        try:
            os.makedirs(d, exist_ok=True)
            common.plot_time_vs_length(
                [dict(r, ms=r.get("fwd_ms")) for r in scaling],
                os.path.join(d, "linear_attention_scaling.png"),
                x="T",
                y="ms",
                title=f"linear attention forward, B*T = {SCALING_TOKENS}, H=16, D=128, bf16",
            )
        except Exception:  # noqa: BLE001 - the plot is optional
            traceback.print_exc()
    return rows, COLUMNS


def tune(quick: bool, out: str | None) -> list:
    """Autotunes the Triton kernels at ``[8, 4096, 16, 128]`` (``[2, 4096, 16, 128]`` when
    quick) for the scalar and the per-channel decay; returns the ``tune.Result`` of each."""
    B, T, H, D = QUICK_SHAPES[0] if quick else SHAPES[0]
    results = []
    for decay in ("scalar", "channel"):
        q, k, v, g, _ = _inputs(B, T, H, D, decay)
        results.append(
            common.autotune(
                linear_attention,
                (q, k, v, g),
                implementation="pallas_triton",
                out=out,
                shape=f"{B}x{T}x{H}x{D} {decay}",
            )
        )
    return results
