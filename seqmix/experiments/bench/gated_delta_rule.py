"""The gated delta rule: every seqmix implementation beside flash-linear-attention.

    python -m seqmix.experiments.bench_kernels --op=gated_delta_rule [--quick]

Rows: [B, T, H, D] in ``SHAPES`` (H q/k heads = v heads, K = V = D), bf16 q, k, v (k
L2-normalised, as the layers give it), float32 beta ``sigmoid(N(0, 1))`` (rounded to bf16
values so that the peer sees the same numbers) and log decays ``log_sigmoid(N(0, 1)) / 16``,
chunk 64. Every implementation of ``seqmix.kernels.delta_rule.api.GATED_DELTA_RULE`` that
can run here except the oracle (today ``xla``; kernel backends appear as they are added) is
timed forward and forward+backward; the peer is ``fla.ops.gated_delta_rule.
chunk_gated_delta_rule`` (forward, and forward+backward where it runs).

Per row: ms, bytes moved against the copy ceiling (q, k, v, beta, g read once, o written
once), FLOP/s of the chunked algorithm against the bf16 matmul ceiling (per chunk of C
tokens and head: ``6 C^2 K + 4 C^2 V + 6 C K V + C^3 / 3``: K K^T, the triangular solve,
W, U, the state pass's two matmuls, q S, q K^T and the intra-chunk product), tokens/s, the
relative error of the output against seqmix ``xla`` and against flash-linear-attention.

On a CPU (a dry run: no GPU, no peer) the rows are one tiny shape, ``CPU_SHAPES``, and the
``naive`` oracle is timed too, so that its ``rel_err_xla`` checks the chunked form.
"""

from __future__ import annotations

import traceback

import jax
import jax.numpy as jnp
import numpy as np

from seqmix.experiments.bench import common
from seqmix.kernels import dispatch, gated_delta_rule
from seqmix.kernels.delta_rule.api import GATED_DELTA_RULE
from seqmix.kernels.delta_rule.tuning import TritonConfig

SHAPES = [(8, 4096, 16, 128), (8, 4096, 16, 64), (2, 16384, 16, 128)]
QUICK_SHAPES = [(8, 4096, 16, 128)]
CPU_SHAPES = [(1, 96, 2, 16)]
CHUNK = 64
PEER = ("fla.ops.gated_delta_rule", "chunk_gated_delta_rule")

COLUMNS = [
    "impl",
    "B",
    "T",
    "H",
    "D",
    "fwd_ms",
    "fwdbwd_ms",
    "fwd_TBps",
    "copy_frac",
    "fwd_TFLOPs",
    "matmul_frac",
    "Mtok_per_s",
    "fwd_mem_mb",
    "rel_err_xla",
    "rel_err_fla",
    "error",
]


def implementations(platform: str) -> list[str]:
    """The seqmix implementations timed on ``platform``: every one available there but the
    oracle, which joins only on the CPU (the dry run's check of the chunked form)."""
    names = [n for n in GATED_DELTA_RULE.impls if n != "naive" and dispatch.available(n)]
    if platform == "gpu" and "pallas_triton" in names:
        names += list(VARIANTS)
    return names + (["naive"] if platform == "cpu" else [])


def inputs(B, T, H, D, seed=0):
    """``(q, k, v, beta, g, do)``: bf16 q, k (L2-normalised), v, do; float32 beta and g."""
    ks = jax.random.split(jax.random.key(seed), 6)
    q = jax.random.normal(ks[0], (B, T, H, D), jnp.float32).astype(jnp.bfloat16)
    k = jax.random.normal(ks[1], (B, T, H, D), jnp.float32)
    k = (k / jnp.linalg.norm(k, axis=-1, keepdims=True)).astype(jnp.bfloat16)
    v = jax.random.normal(ks[2], (B, T, H, D), jnp.float32).astype(jnp.bfloat16)
    beta = jax.nn.sigmoid(jax.random.normal(ks[3], (B, T, H), jnp.float32))
    beta = beta.astype(jnp.bfloat16).astype(jnp.float32)
    g = jax.nn.log_sigmoid(jax.random.normal(ks[4], (B, T, H), jnp.float32)) / 16
    do = jax.random.normal(ks[5], (B, T, H, D), jnp.float32).astype(jnp.bfloat16)
    return q, k, v, beta, g, do


def forward_bytes(B, T, H, D) -> int:
    return 4 * B * T * H * D * 2 + 2 * B * T * H * 4


def forward_flops(B, T, H, D, C=CHUNK) -> float:
    """FLOPs of the chunked forward (module docstring), K = V = D."""
    n = -(-T // C)
    per_chunk = 6 * C * C * D + 4 * C * C * D + 6 * C * D * D + C**3 / 3
    return float(B * H * n * per_chunk)


# Other settings of the Triton kernels timed beside the table's on a GPU.
VARIANTS = {
    # the WY backward as two kernels against the table's fused one
    "pallas_triton[wy split]": ("pallas_triton", TritonConfig(wy_backward="split")),
    # the forward's w, states and v_new kept for the backward instead of recomputed there
    "pallas_triton[saved states]": ("pallas_triton", TritonConfig(save_states=True)),
}


def seqmix_fns(impl: str):
    impl, config = VARIANTS.get(impl, (impl, None))

    def fwd(q, k, v, beta, g):
        return gated_delta_rule(
            q, k, v, beta, g, chunk_size=CHUNK, implementation=impl, config=config
        )

    def fwd_bwd(q, k, v, beta, g, do):
        o, vjp = jax.vjp(fwd, q, k, v, beta, g)
        return o, vjp(do)

    return jax.jit(fwd), jax.jit(fwd_bwd)


def fla_fns(q, k, v, beta, g, do):
    """(forward, forward+backward, output) of flash-linear-attention's chunked gated delta
    rule on the same values (torch tensors through DLPack, layout [B, T, H, D])."""
    import importlib

    import torch

    fn = getattr(importlib.import_module(PEER[0]), PEER[1])

    def to_torch(x):
        try:
            return torch.from_dlpack(x)
        except Exception:  # noqa: BLE001 - fall back to a host copy
            return (
                torch.tensor(np.asarray(x.astype(jnp.float32)))
                .cuda()
                .to(torch.bfloat16 if x.dtype == jnp.bfloat16 else torch.float32)
            )

    jax.block_until_ready((q, k, v, beta, g, do))
    tq, tk, tv, tg, tdo = (to_torch(x) for x in (q, k, v, g, do))
    tb = to_torch(beta).to(torch.bfloat16)
    scale = q.shape[-1] ** -0.5

    def call(q, k, v, g, beta):
        return fn(q=q, k=k, v=v, g=g, beta=beta, scale=scale, output_final_state=False)[0]

    def forward():
        return call(tq, tk, tv, tg, tb)

    leaves = [t.detach().clone().requires_grad_(True) for t in (tq, tk, tv, tg, tb)]

    def forward_backward():
        return torch.autograd.grad(call(*leaves), leaves, tdo)

    with torch.no_grad():
        out = forward()
    return forward, forward_backward, np.asarray(out.float().cpu().numpy())


def _fill(row, ms, B, T, H, D, ceilings):
    row["fwd_ms"] = ms
    row["fwd_TBps"] = forward_bytes(B, T, H, D) / (ms * 1e-3) / 1e12
    row["fwd_TFLOPs"] = forward_flops(B, T, H, D) / (ms * 1e-3) / 1e12
    if ceilings.get("copy_tbps"):
        row["copy_frac"] = row["fwd_TBps"] / ceilings["copy_tbps"]
    if ceilings.get("bf16_matmul_tflops"):
        row["matmul_frac"] = row["fwd_TFLOPs"] / ceilings["bf16_matmul_tflops"]
    row["Mtok_per_s"] = B * T / (ms * 1e-3) / 1e6


def measure_shape(B, T, H, D, ceilings, impls) -> list[dict]:
    rows = common.new_rows()
    q, k, v, beta, g, do = inputs(B, T, H, D)
    outs = {}
    for impl in impls:
        row = {"impl": f"seqmix_{impl}", "B": B, "T": T, "H": H, "D": D}
        rows.append(row)
        fwd, fwd_bwd = seqmix_fns(impl)
        out = common.attempt(row, "forward", lambda fwd=fwd: fwd(q, k, v, beta, g))
        if out is None:
            continue
        outs[impl] = out
        t = common.attempt(row, "forward", lambda fwd=fwd: common.time_jax(fwd, q, k, v, beta, g))
        if t is not None:
            _fill(row, t * 1e3, B, T, H, D, ceilings)
        mem = common.compiled_bytes(fwd, q, k, v, beta, g)
        row["fwd_mem_mb"] = None if mem is None else mem / 2**20
        t = common.attempt(
            row, "backward", lambda f=fwd_bwd: common.time_jax(f, q, k, v, beta, g, do)
        )
        if t is not None:
            row["fwdbwd_ms"] = t * 1e3
    fla_row = {"impl": f"fla_{PEER[1]}", "B": B, "T": T, "H": H, "D": D}
    rows.append(fla_row)
    peer = common.attempt(fla_row, "fla", lambda: fla_fns(q, k, v, beta, g, do))
    if peer is not None:
        forward, forward_backward, outs["fla"] = peer
        t = common.attempt(fla_row, "fla forward", lambda: common.time_torch(forward))
        if t is not None:
            _fill(fla_row, t * 1e3, B, T, H, D, ceilings)
        t = common.attempt(fla_row, "fla backward", lambda: common.time_torch(forward_backward))
        if t is not None:
            fla_row["fwdbwd_ms"] = t * 1e3
    for row, key in zip(rows, [*impls, "fla"]):
        if key in outs and key != "xla" and "xla" in outs:
            row["rel_err_xla"] = common.rel_err(outs[key], outs["xla"])
        if key in outs and key != "fla" and "fla" in outs:
            row["rel_err_fla"] = common.rel_err(outs[key], outs["fla"])
    print(common.markdown_table(rows, COLUMNS), flush=True)
    return rows


def run(quick: bool = False, ceilings: dict | None = None):
    """Benchmark rows and the table's columns (see the module docstring)."""
    ceilings = ceilings or {}
    platform = dispatch.platform()
    if platform == "cpu":
        shapes = CPU_SHAPES
    else:
        shapes = QUICK_SHAPES if quick else SHAPES
    rows = []
    for B, T, H, D in shapes:
        try:
            rows += measure_shape(B, T, H, D, ceilings, implementations(platform))
        except Exception:  # noqa: BLE001 - one shape failing must not stop the run
            traceback.print_exc()
    return rows, COLUMNS


def tune(quick: bool, out: str | None) -> list:
    """Autotunes the Triton kernels (forward + backward) at the first of ``QUICK_SHAPES``
    (quick) or ``SHAPES``, with decay; returns the ``tune.Result``."""
    B, T, H, D = QUICK_SHAPES[0] if quick else SHAPES[0]
    q, k, v, beta, g, _ = inputs(B, T, H, D)
    return [
        common.autotune(
            gated_delta_rule,
            (q, k, v, beta, g),
            implementation="pallas_triton",
            kwargs={"chunk_size": CHUNK},
            out=out,
            shape=f"{B}x{T}x{H}x{D} scalar",
        )
    ]
