"""selective_scan: the Pallas Triton and TPU kernels (interpret mode) against the naive oracle,
outputs, final states and every gradient; and lowering for an H200 and a TPU."""

import dataclasses

import jax
import jax.numpy as jnp
import pytest

from seqmix import testing
from seqmix.kernels import interpret, selective_scan
from seqmix.kernels.selective_scan import tpu as scan_tpu
from seqmix.kernels.selective_scan import triton as scan_triton

IMPLS = ["pallas_triton", "pallas_tpu"]
NAMES = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state"]


def _inputs(seed, Bsz, T, Dm, N, G, dtype, *, squeeze=False, strong_decay=False):
    ks = jax.random.split(jax.random.key(seed), 9)
    u = jax.random.normal(ks[0], (Bsz, T, Dm), jnp.float32).astype(dtype)
    delta = (0.5 * jax.random.normal(ks[1], (Bsz, T, Dm), jnp.float32)).astype(dtype)
    lo, hi = (2.0, 3.0) if strong_decay else (-1.0, 1.0)  # A down to -20 with dt up to ~3
    A = -jnp.exp(jax.random.uniform(ks[2], (Dm, N), jnp.float32, lo, hi))
    bc_shape = (Bsz, T, N) if squeeze else (Bsz, T, G, N)
    B = jax.random.normal(ks[3], bc_shape, jnp.float32).astype(dtype)
    C = jax.random.normal(ks[4], bc_shape, jnp.float32).astype(dtype)
    D = jax.random.normal(ks[5], (Dm,), jnp.float32)
    z = jax.random.normal(ks[6], (Bsz, T, Dm), jnp.float32).astype(dtype)
    bias = 0.5 * jax.random.normal(ks[7], (Dm,), jnp.float32) + (1.0 if strong_decay else 0.0)
    h0 = jax.random.normal(ks[8], (Bsz, Dm, N), jnp.float32)
    return [u, delta, A, B, C, D, z, bias, h0]


def _check(impl, args, *, use, softplus, tol, seed, blocks=None):
    """Compares impl with the oracle; ``use`` names the optional arguments given."""
    diff = [i for i, n in enumerate(NAMES) if n in ("u", "delta", "A", "B", "C") or n in use]
    args = [
        a if (n in ("u", "delta", "A", "B", "C") or n in use) else None for n, a in zip(NAMES, args)
    ]

    def run(implementation):
        def f(u, delta, A, B, C, D, z, bias, h0):
            kw = dict(delta_bias=bias, delta_softplus=softplus, initial_state=h0)
            if blocks is not None and implementation == impl:  # explicit tile sizes
                mod = scan_triton if implementation == "pallas_triton" else scan_tpu
                B = B if B.ndim == 4 else B[:, :, None]
                C = C if C.ndim == 4 else C[:, :, None]
                return mod.selective_scan(u, delta, A, B, C, D, z, blocks=blocks, **kw)
            return selective_scan(
                u,
                delta,
                A,
                B,
                C,
                D,
                z,
                return_final_state=True,
                implementation=implementation,
                **kw,
            )

        return f

    with interpret():
        testing.check_against(
            run(impl),
            run("naive"),
            args,
            argnums=diff,
            tol=tol,
            seed=seed,
            names=[NAMES[i] for i in diff],
        )


ALL = ("D", "z", "delta_bias", "initial_state")
CASES = {
    # name: (Bsz, T, Dm, N, G, squeeze, dtype, use, softplus, strong_decay)
    "groups-odd-T-all-args": (2, 13, 24, 4, 2, False, jnp.float32, ALL, True, False),
    "T1-BTN-form-no-optional": (1, 1, 8, 3, 1, True, jnp.float32, (), False, False),
    "bf16-strong-decay-z-D-state": (
        1,
        11,
        16,
        4,
        1,
        False,
        jnp.bfloat16,
        ("D", "z", "initial_state"),
        True,
        True,
    ),
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_oracle(impl, case):
    Bsz, T, Dm, N, G, squeeze, dtype, use, softplus, strong = CASES[case]
    seed = testing.fresh_seed()
    args = _inputs(seed, Bsz, T, Dm, N, G, dtype, squeeze=squeeze, strong_decay=strong)
    _check(impl, args, use=use, softplus=softplus, tol=testing.tolerance(dtype), seed=seed)


# The one-channel-per-lane kernels (triton_lanes.py, the GPU default; interpret mode runs the
# blocked ones unless told) at interpret-mode sizes: 8 channels per program, chunks of 2
# backward tiles of 2 steps.
LANES = scan_triton.Blocks(
    algorithm="lanes", block_d=8, chunk=4, bwd_tile=2, num_warps=1, bwd_num_warps=1, segments=1
)


@pytest.mark.parametrize("case", list(CASES))
def test_triton_lanes_matches_oracle(case):
    Bsz, T, Dm, N, G, squeeze, dtype, use, softplus, strong = CASES[case]
    seed = testing.fresh_seed()
    args = _inputs(seed, Bsz, T, Dm, N, G, dtype, squeeze=squeeze, strong_decay=strong)
    _check(
        "pallas_triton",
        args,
        use=use,
        softplus=softplus,
        tol=testing.tolerance(dtype),
        seed=seed,
        blocks=LANES,
    )


@pytest.mark.parametrize("algorithm", ["blocked", "lanes"])
def test_triton_time_segments_tiles_and_channel_blocks(algorithm):
    """3 time segments (chained start states and end adjoints), chunks of 2 backward tiles,
    2 channel blocks per group, T padded to the segments."""
    seed = testing.fresh_seed()
    args = _inputs(seed, 1, 13, 32, 2, 2, jnp.float32)
    blocks = scan_triton.Blocks(block_d=8, chunk=4, bwd_tile=2, segments=3)
    if algorithm == "lanes":
        blocks = dataclasses.replace(LANES, segments=3)
    _check("pallas_triton", args, use=ALL, softplus=True, tol=1e-5, seed=seed, blocks=blocks)


@pytest.mark.parametrize("algorithm", ["blocked", "lanes"])
def test_triton_whole_padding_segment(algorithm):
    """T = 8 in 3 segments of 4 steps: the last segment is all padding and must not decay
    the final state (T is a multiple of the segment length there)."""
    seed = testing.fresh_seed()
    args = _inputs(seed, 1, 8, 16, 2, 1, jnp.float32)
    blocks = dataclasses.replace(LANES, algorithm=algorithm, segments=3)
    kw = dict(delta_bias=args[7], delta_softplus=True, initial_state=args[8])
    with interpret():
        y, h = scan_triton.selective_scan(*args[:7], blocks=blocks, **kw)
    y_ref, h_ref = selective_scan(*args[:7], return_final_state=True, implementation="naive", **kw)
    testing.assert_close(y, y_ref, 1e-5, f"y (seed {seed})")
    testing.assert_close(h, h_ref, 1e-5, f"final state (seed {seed})")


def test_tpu_several_slabs_per_group():
    """Groups of 2048 channels split into two programs of 8 x 128 lanes; dB/dC summed."""
    seed = testing.fresh_seed()
    args = _inputs(seed, 1, 3, 4096, 2, 2, jnp.float32)
    _check(
        "pallas_tpu",
        args,
        use=ALL,
        softplus=True,
        tol=1e-5,
        seed=seed,
        blocks=scan_tpu.Blocks(chunk=4, max_rows=8),
    )


@pytest.mark.parametrize("algorithm", ["blocked", "lanes"])
def test_no_nan_long_strong_decay_float32(algorithm):
    """dt * A down to about -60 per step over 300 steps: finite and equal to the oracle."""
    seed = testing.fresh_seed()
    args = _inputs(seed, 1, 300, 8, 2, 1, jnp.float32, strong_decay=True)
    with interpret():
        if algorithm == "lanes":
            y, h = scan_triton.selective_scan(
                *args[:7],
                delta_bias=args[7],
                delta_softplus=True,
                initial_state=args[8],
                blocks=LANES,
            )
        else:
            y, h = selective_scan(
                *args[:7],
                delta_bias=args[7],
                delta_softplus=True,
                initial_state=args[8],
                return_final_state=True,
                implementation="pallas_triton",
            )
    y_ref, h_ref = selective_scan(
        *args[:7],
        delta_bias=args[7],
        delta_softplus=True,
        initial_state=args[8],
        return_final_state=True,
        implementation="naive",
    )
    testing.assert_close(y, y_ref, 1e-5, "y")
    testing.assert_close(h, h_ref, 1e-5, "final state")


_BF, _F32, _SD = jnp.bfloat16, jnp.float32, jax.ShapeDtypeStruct
# [2, 2048, 1536, 16]: u, delta, A, B, C, D, z, delta_bias, initial_state
_LOWERING_ARGS = [
    _SD((2, 2048, 1536), _BF),
    _SD((2, 2048, 1536), _BF),
    _SD((1536, 16), _F32),
    _SD((2, 2048, 1, 16), _BF),
    _SD((2, 2048, 1, 16), _BF),
    _SD((1536,), _F32),
    _SD((2, 2048, 1536), _BF),
    _SD((1536,), _F32),
    _SD((2, 1536, 16), _F32),
]


@pytest.mark.parametrize("implementation", IMPLS)
def test_lowers_forward_and_backward(implementation):
    """[2, 2048, 1536, 16] bf16 with every optional argument, through the public op: the
    Triton kernels (time segments included) lower for an H200 and the Mosaic kernels for a
    TPU (nothing runs)."""
    platform = "cuda" if implementation == "pallas_triton" else "tpu"
    f32 = jnp.float32

    def loss(u, delta, A, B, C, D, z, bias, h0):
        y, h = selective_scan(
            u,
            delta,
            A,
            B,
            C,
            D,
            z,
            delta_bias=bias,
            delta_softplus=True,
            initial_state=h0,
            return_final_state=True,
            implementation=implementation,
        )
        return jnp.sum(y.astype(f32)) + jnp.sum(h)

    text = testing.lower_for(
        jax.grad(loss, argnums=tuple(range(9))), *_LOWERING_ARGS, platform=platform
    )
    marker = "__gpu$xla.gpu.triton" if platform == "cuda" else "tpu_custom_call"
    # Triton: local + main forward, adjoint + main backward (4 segments); TPU: fwd + bwd.
    expected = 4 if platform == "cuda" else 2
    assert text.count(marker) >= expected, (
        f"expected {expected} kernels, found {text.count(marker)}"
    )


@pytest.mark.parametrize(
    "blocks,prefix",
    [
        (scan_triton.LANES_BLOCKS, "selective_scan_lanes_"),  # the GPU default
        (scan_triton.BLOCKED_BLOCKS, "selective_scan_"),
    ],
)
def test_triton_algorithms_lower_forward_and_backward(blocks, prefix):
    """Both Triton algorithms at [2, 2048, 1536, 16] bf16 with every optional argument lower
    for an H200: local + main forward, adjoint + main backward (time segments). Nothing
    runs."""
    f32 = jnp.float32

    def loss(u, delta, A, B, C, D, z, bias, h0):
        y, h = scan_triton.selective_scan(
            u,
            delta,
            A,
            B,
            C,
            D,
            z,
            delta_bias=bias,
            delta_softplus=True,
            initial_state=h0,
            blocks=blocks,
        )
        return jnp.sum(y.astype(f32)) + jnp.sum(h)

    text = testing.lower_for(
        jax.grad(loss, argnums=tuple(range(9))), *_LOWERING_ARGS, platform="cuda"
    )
    for name in ("local", "fwd", "adjoint", "bwd"):
        assert f"{prefix}{name}" in text, f"kernel {prefix}{name} missing from the module"
    # the blocked kernels' names are not substrings of the lanes ones, and vice versa
    assert ("selective_scan_lanes_" in text) == (blocks is scan_triton.LANES_BLOCKS)
