"""Mamba-1's selective scan: implementations side by side.

    python -m seqmix.experiments.bench_kernels --op=selective_scan [--quick]
    python -m seqmix.experiments.bench_kernels --op=selective_scan --tune --tuning_out=t.json

seqmix ``pallas_triton`` against seqmix ``xla`` (``lax.associative_scan``),
``[B, T, Dm, N]`` with ``B * T = 32k`` tokens, Dm = 1536, N = 16, T = 1k..16k (the headline
shapes, [8, 4096, 1536, 16] and [2, 16384, 1536, 16], are the quick run's); bf16 u, delta, z, B, C (one
group), float32 A, D, delta_bias; delta_softplus, D and z given. At T = 4k and 16k,
``pallas_triton[...]`` rows time other chunk, channel-tile and warp choices through the public
op's ``config=`` (``variants``). No peer: the mamba_ssm CUDA package has no wheel on the device.

Each row: forward and forward+backward time; ``*_gbs``, the bytes of reading every input
(and, for forward+backward, the output cotangent) once and writing every output (y and
every gradient) once, per second; ``*_x_rowo``, the time over that read-once-write-once
time at the copy bandwidth measured in the same run; ``fb_vs_xla``, xla's forward+backward
time over this one's; ``err_y`` / ``err_grad``: relative error of y / the worst gradient
against ``xla`` at the same shape. On a CPU (a dry run) one tiny ragged shape runs, the
Pallas kernels in interpret mode, so its ``err_*`` check them against ``xla``. Plots of time against T go next to the JSON.
``--tune`` runs the autotuner (``seqmix.kernels.tune``) over ``tuning.SEARCH`` at
[8, 4096, 1536, 16]. ``SEQMIX_BENCH_FILTER=<substring>`` keeps only the shapes whose label
contains it.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp

from seqmix.experiments.bench import common
from seqmix.kernels import dispatch
from seqmix.kernels.selective_scan.tuning import TritonConfig

TOKENS = 32768
DTYPE = jnp.bfloat16
SCAN = dict(Dm=1536, N=16)
COLUMNS = common.ROWO_COLUMNS


# The headline shapes, [8, 4096, 1536, 16] and [2, 16384, 1536, 16]: the quick run's rows.
HEADLINE = (4096, 16384)
# The CPU dry run: one tiny ragged shape, the Pallas kernels in interpret mode.
CPU_SHAPE = dict(label="dry 2x37x32x4", B=2, T=37, Dm=32, N=4)


def shapes(quick: bool) -> list[dict]:
    if dispatch.platform() == "cpu":
        return [CPU_SHAPE]
    lengths = HEADLINE if quick else (1024, 2048, 4096, 8192, 16384)
    return common.filtered(
        [
            dict(label=f"{TOKENS // T}x{T}x{SCAN['Dm']}x{SCAN['N']}", B=TOKENS // T, T=T, **SCAN)
            for T in lengths
        ]
    )


def inputs(B: int, T: int, Dm: int, N: int, G: int = 1):
    """``((u, delta, A, B, C, D, z, delta_bias), dy)`` at one shape."""
    ks = jax.random.split(jax.random.key(0), 9)
    u = jax.random.normal(ks[0], (B, T, Dm), DTYPE)
    delta = (0.5 * jax.random.normal(ks[1], (B, T, Dm), jnp.float32) - 1.0).astype(DTYPE)
    A = -jnp.exp(jax.random.uniform(ks[2], (Dm, N), jnp.float32, 0.0, 2.5))
    Bm = jax.random.normal(ks[3], (B, T, G, N), DTYPE)
    Cm = jax.random.normal(ks[4], (B, T, G, N), DTYPE)
    D = jax.random.normal(ks[5], (Dm,), jnp.float32)
    z = jax.random.normal(ks[6], (B, T, Dm), DTYPE)
    bias = 0.5 * jax.random.normal(ks[7], (Dm,), jnp.float32)
    dy = jax.random.normal(ks[8], (B, T, Dm), DTYPE)
    return (u, delta, A, Bm, Cm, D, z, bias), dy


def scan_fn(impl: str, config: TritonConfig | None = None):
    """The public op at ``implementation=impl`` (with ``config``) on ``inputs``' arguments;
    Pallas kernels in interpret mode on a CPU (the dry run)."""
    interpret = dispatch.platform() == "cpu" and impl.startswith("pallas")

    def f(u, delta, A, B, C, D, z, bias):
        from seqmix.kernels import interpret as interpret_mode
        from seqmix.kernels import selective_scan

        with interpret_mode() if interpret else contextlib.nullcontext():
            return selective_scan(
                u,
                delta,
                A,
                B,
                C,
                D,
                z,
                delta_bias=bias,
                delta_softplus=True,
                implementation=impl,
                config=config,
            )

    return f


def variants(T: int) -> dict[str, TritonConfig]:
    """Other tiles of the chunked Triton kernels, timed at T = 4k and 16k: chunks of 16 and
    64 steps, 4 and 16 channels a program, and 2 / 8 warps; and the lanes kernels for the
    training path (the forward row is the chunked forward either way)."""
    return {
        "pallas_triton[lanes]": TritonConfig(algorithm="lanes"),
        "pallas_triton[c16]": TritonConfig(chunk=16),
        "pallas_triton[c64]": TritonConfig(chunk=64),
        "pallas_triton[d4]": TritonConfig(block_d=4),
        "pallas_triton[d16 w8]": TritonConfig(block_d=16, num_warps=8),
        "pallas_triton[w2]": TritonConfig(num_warps=2, bwd_num_warps=4),
    }


def run(quick: bool, ceilings: dict) -> tuple[list[dict], list[str]]:
    """Rows and the columns to print."""

    def impls_for(s):
        impls = {"xla": scan_fn("xla"), "pallas_triton": scan_fn("pallas_triton")}
        if not quick and s["T"] in (4096, 16384):
            impls.update({k: scan_fn("pallas_triton", c) for k, c in variants(s["T"]).items()})
        return impls

    rows = common.new_rows()
    rows.extend(
        common.iter_shapes(
            shapes(quick),  # row by row: a time limit keeps them
            lambda s: inputs(s["B"], s["T"], s["Dm"], s["N"]),
            impls_for,
            COLUMNS,
            ceilings.get("copy_tbps"),
        )
    )
    common.plots(rows, "selective_scan", f"bf16, Dm={SCAN['Dm']}, N={SCAN['N']}, {TOKENS} tokens")
    return rows, COLUMNS


def tune(quick: bool, out: str | None) -> list:
    """Autotunes the Triton kernels at [8, 4096, 1536, 16] ([2, 2048, ...] when quick)."""
    from seqmix.kernels import selective_scan

    B, T = (2, 2048) if quick else (8, 4096)
    args, _ = inputs(B, T, SCAN["Dm"], SCAN["N"])
    return [
        common.autotune(
            selective_scan,
            args[:7],
            implementation="pallas_triton",
            kwargs=dict(delta_bias=args[7], delta_softplus=True),
            out=out,
            shape=f"{B}x{T}x{SCAN['Dm']}x{SCAN['N']}",
        )
    ]
