"""linear_attention / linear_attention_step, implementation="pallas_triton", against the
naive oracle through the public api (Pallas interpret mode on the CPU), and the lowering of
the kernels for an H200 at realistic shapes.

Every check compares outputs, final states and all gradients (dq, dk, dv, d log_decay,
d initial_state) on fresh random inputs; float32 under 1e-5, bf16/fp16 under 5e-3 (two
documented exceptions: STRONG_DECAY_DG_TOL and testing.NORMALIZE_GRAD_TOL).
"""

from unittest import mock

import jax
import jax.numpy as jnp
import pytest

from seqmix import testing
from seqmix.kernels import interpret, linear_attention, linear_attention_step
from seqmix.kernels.linear_attention import step as step_module
from seqmix.kernels.linear_attention import triton as triton_module


@pytest.fixture(autouse=True)
def _interpret_mode():
    with interpret():
        yield


def _inputs(
    seed,
    B,
    T,
    Hqk,
    Hv,
    K,
    V,
    decay,
    dtype,
    *,
    segments=False,
    initial=True,
    decay_range=(-1.0, 0.0),
    normalize=False,
):
    ks = jax.random.split(jax.random.key(seed), 6)
    q = jax.random.normal(ks[0], (B, T, Hqk, K), jnp.float32)
    k = jax.random.normal(ks[1], (B, T, Hqk, K), jnp.float32)
    if normalize:  # positive features (elu + 1), as normalised linear attention uses
        q, k = jax.nn.elu(q) + 1, jax.nn.elu(k) + 1
    q, k = q.astype(dtype), k.astype(dtype)
    v = jax.random.normal(ks[2], (B, T, Hv, V), jnp.float32).astype(dtype)
    lo, hi = decay_range
    shape = {"none": None, "scalar": (B, T, Hv), "channel": (B, T, Hv, K)}[decay]
    g = None if shape is None else jax.random.uniform(ks[3], shape, minval=lo, maxval=hi)
    s0 = jax.random.normal(ks[4], (B, Hv, K, V + int(normalize)), jnp.float32) if initial else None
    # sorted random ids: packed sequences of random lengths
    seg = jnp.sort(jax.random.randint(ks[5], (B, T), 0, 4), axis=1) if segments else None
    return q, k, v, g, s0, seg


# name: B, T, Hqk, Hv, K, V, decay, chunk, dtype, options
CASES = {
    "scalar-groups-segments-T65": (
        2,
        65,
        1,
        2,
        16,
        16,
        "scalar",
        64,
        jnp.float32,
        dict(segments=True),
    ),
    "channel-groups-segments-T65": (
        1,
        65,
        1,
        2,
        16,
        16,
        "channel",
        64,
        jnp.float32,
        dict(segments=True),
    ),
    "none-normalize-T63": (
        2,
        63,
        2,
        2,
        16,
        16,
        "none",
        64,
        jnp.float32,
        dict(initial=False, normalize=True),
    ),
    "scalar-T1": (2, 1, 1, 2, 16, 32, "scalar", 64, jnp.float32, {}),
    # K = 96, V = 80: several (padded) blocks of 64, state blocks of 32: every blocked loop.
    "scalar-strong-decay-blocks-T64": (
        1,
        64,
        1,
        2,
        96,
        80,
        "scalar",
        64,
        jnp.float32,
        dict(decay_range=(-20.0, 0.0), segments=True),
    ),
    "channel-strong-decay-blocks-chunk32": (
        1,
        77,
        1,
        1,
        96,
        80,
        "channel",
        32,
        jnp.float32,
        dict(decay_range=(-20.0, 0.0), segments=True),
    ),
    "scalar-bf16-strong-decay-groups-T65": (
        2,
        65,
        1,
        2,
        32,
        32,
        "scalar",
        64,
        jnp.bfloat16,
        dict(decay_range=(-20.0, 0.0)),
    ),
    "channel-bf16-normalize-segments-chunk32": (
        1,
        70,
        1,
        2,
        32,
        16,
        "channel",
        32,
        jnp.bfloat16,
        dict(segments=True, normalize=True),
    ),
    "none-fp16-segments-chunk16": (
        2,
        50,
        2,
        4,
        16,
        16,
        "none",
        16,
        jnp.float16,
        dict(segments=True),
    ),
}


# With log decays uniform in [-20, 0] the log-decay gradient is a sum of large terms that
# nearly cancel: in float32 even the xla chunked form lands 1e-5 to 4e-5 from the float32
# oracle there, so that one gradient gets this tolerance in those cases. In bf16 the same
# cancellation has a heavy tail: against the float32 oracle, 6.7e-4 mean, 1.6e-3 at the
# 90th percentile and 3.5e-3 max over 40 seeds, 9.7e-3 max over another 12 (2026-11-29;
# 8.4e-3 had failed a CI run on 2026-11-28 under the earlier 5e-3).
STRONG_DECAY_DG_TOL = {"float32": 2e-4, "bfloat16": 4e-2}


def _check(B, T, Hqk, Hv, K, V, decay, chunk, dtype, options):
    seed = testing.fresh_seed()
    options = dict(options)
    normalize = options.get("normalize", False)
    tuning = options.pop("tuning", {})
    q, k, v, g, s0, seg = _inputs(seed, B, T, Hqk, Hv, K, V, decay, dtype, **options)
    with mock.patch.dict(triton_module.TUNING, tuning):  # the public api reads TUNING
        _compare(seed, q, k, v, g, s0, seg, normalize, chunk, dtype, options)


def _compare(seed, q, k, v, g, s0, seg, normalize, chunk, dtype, options):

    def run(impl):
        def fn(q, k, v, g, s0):
            return linear_attention(
                q,
                k,
                v,
                g,
                initial_state=s0,
                return_final_state=True,
                segment_ids=seg,
                normalize=normalize,
                chunk_size=chunk,
                implementation=impl,
            )

        return jax.jit(fn)  # one compilation instead of op-by-op dispatch

    args = (q, k, v, g, s0)
    tol = testing.tolerance(dtype)
    out, vjp = jax.vjp(run("pallas_triton"), *args)
    ref, vjp_ref = jax.vjp(run("naive"), *testing.upcast(args))  # the oracle in float32
    for name, a, b in zip(("o", "final_state"), out, ref):
        testing.assert_close(a, b, tol, f"{name} (seed {seed})")
    ct = testing.random_cotangent(out, jax.random.key(seed + 1))
    ct_ref = testing.upcast(ct)
    strong = (
        options.get("decay_range", (0, 0))[0] <= -20
        and jnp.dtype(dtype).name in STRONG_DECAY_DG_TOL
    )
    for name, a, b in zip(("q", "k", "v", "log_decay", "initial_state"), vjp(ct), vjp_ref(ct_ref)):
        if b is not None:
            dg_tol = (
                STRONG_DECAY_DG_TOL[jnp.dtype(dtype).name]
                if strong and name == "log_decay"
                else tol
            )
            if normalize:
                lowp = testing.NORMALIZE_GRAD_TOL.get(jnp.dtype(dtype).name, {})
                dg_tol = max(dg_tol, lowp.get(name, dg_tol))
            testing.assert_close(a, b, dg_tol, f"d{name} (seed {seed})")


@pytest.mark.parametrize("name", list(CASES))
def test_matches_naive(name):
    _check(*CASES[name])


# TUNING variants through the public api (TUNING patched for the call):
# "state_segments" (two-level state passes: P segments of the chunks walked in parallel,
# combined, and completed in the per-chunk kernels) and "fused_forward" (no stored states in
# the forward). Weak decays (down to -0.05 per token) so that states cross every segment
# boundary; lengths that leave the last segment (and chunk) short.
TUNED_CASES = {
    # 7 chunks of 16 in segments of 3, 3, 1; groups, initial state
    "scalar-groups-T100-P3": (
        1,
        100,
        1,
        2,
        16,
        16,
        "scalar",
        16,
        jnp.float32,
        dict(decay_range=(-0.05, 0.0), tuning={"state_segments": 3}),
    ),
    # per channel, runs (state resets) and K, V of several blocks (state blocks of 32)
    "channel-runs-blocks-T77-P4": (
        1,
        77,
        1,
        1,
        48,
        40,
        "channel",
        16,
        jnp.float32,
        dict(
            decay_range=(-0.05, 0.0), segments=True, tuning={"state_segments": 4, "state_block": 32}
        ),
    ),
    # "auto" with a tiny grid: P = min(ceil(64 / 4 programs), 5 chunks) = 5
    "none-normalize-auto-T70": (
        2,
        70,
        2,
        2,
        16,
        16,
        "none",
        16,
        jnp.float32,
        dict(
            normalize=True,
            tuning={"state_segments": "auto", "segment_programs": 64, "min_segment_chunks": 1},
        ),
    ),
    "scalar-bf16-strong-decay-runs-T65-P2": (
        1,
        65,
        1,
        2,
        32,
        32,
        "scalar",
        16,
        jnp.bfloat16,
        dict(decay_range=(-20.0, 0.0), segments=True, tuning={"state_segments": 2}),
    ),
    # fused forward in one pass; groups, initial state
    "fused-scalar-groups-T100": (
        1,
        100,
        1,
        2,
        32,
        32,
        "scalar",
        16,
        jnp.float32,
        dict(decay_range=(-0.05, 0.0), tuning={"fused_forward": True}),
    ),
    # fused forward after a store-free two-level state pass; per channel, runs, two key blocks
    "fused-channel-runs-blocks-T77-P2": (
        1,
        77,
        1,
        1,
        32,
        16,
        "channel",
        16,
        jnp.float32,
        dict(
            decay_range=(-0.05, 0.0),
            segments=True,
            tuning={"fused_forward": True, "block_k": 16, "state_segments": 2},
        ),
    ),
}


@pytest.mark.parametrize("name", list(TUNED_CASES))
def test_tuned_variant_matches_naive(name):
    B, T, Hqk, Hv, K, V, decay, chunk, dtype, options = TUNED_CASES[name]
    tuning = options["tuning"]
    x = jnp.zeros((B, T, Hqk, K), dtype)
    g = {"none": None, "scalar": jnp.zeros((B, T, Hv)), "channel": jnp.zeros((B, T, Hv, K))}
    plan = triton_module.make_plan(
        x,
        jnp.zeros((B, T, Hv, V), dtype),
        g[decay],
        None,
        None,
        scale=1.0,
        chunk_size=chunk,
        config=tuning,
    )
    # the variant asked for is the one under test
    assert (plan.segments > 1) == bool(tuning.get("state_segments")), plan  # (auto: 1 here)
    assert plan.fused == tuning.get("fused_forward", False), plan
    _check(*TUNED_CASES[name])


@pytest.mark.parametrize("B,T,want", [(8, 4096, 1), (2, 16384, 5), (1, 65536, 9)])
def test_two_level_auto_segments_at_benchmark_shapes(B, T, want):
    """ "auto" keeps one pass where the grid is full and splits where it is not (H = 16,
    D = 128: 4 state blocks of 64x64 per head)."""
    x = jax.ShapeDtypeStruct((B, T, 16, 128), jnp.bfloat16)
    plan = triton_module.make_plan(
        x,
        x,
        jax.ShapeDtypeStruct((B, T, 16), jnp.float32),
        None,
        None,
        scale=1.0,
        chunk_size=64,
        config={"state_segments": "auto"},
    )
    assert plan.segments == want
    assert (plan.segments - 1) * plan.segment_chunks < plan.chunks
    assert plan.segments * plan.segment_chunks >= plan.chunks
    if want > 1:
        assert (plan.state_block_k, plan.state_block_v) == (64, 64)
    g = jax.ShapeDtypeStruct((B, T, 16), jnp.float32)
    default = triton_module.make_plan(x, x, g, None, None, scale=1.0, chunk_size=64)
    assert default.segments == want  # "auto" is the default
    single = triton_module.make_plan(
        x, x, g, None, None, scale=1.0, chunk_size=64, config={"state_segments": None}
    )
    assert single.segments == 1


def test_state_segments_must_be_valid():
    x = jnp.zeros((1, 64, 1, 16))
    with pytest.raises(ValueError, match="state_segments"):
        triton_module.make_plan(
            x, x, None, None, None, scale=1.0, chunk_size=16, config={"state_segments": "many"}
        )


@pytest.mark.parametrize("decay", ["scalar", "channel"])
def test_segment_boundaries_at_chunk_edges(decay):
    """Runs that start exactly at a chunk start, and a one-token run at a chunk's end."""
    seed = testing.fresh_seed()
    q, k, v, g, s0, _ = _inputs(seed, 1, 48, 1, 2, 16, 16, decay, jnp.float32)
    seg = jnp.array([[0] * 16 + [1] * 15 + [2] + [3] * 16])

    def run(impl):
        return jax.jit(
            lambda q, k, v, g, s0: linear_attention(
                q,
                k,
                v,
                g,
                initial_state=s0,
                return_final_state=True,
                segment_ids=seg,
                chunk_size=16,
                implementation=impl,
            )
        )

    testing.check_against(
        run("pallas_triton"),
        run("naive"),
        (q, k, v, g, s0),
        argnums=(0, 1, 2, 3, 4),
        tol=1e-5,
        seed=seed,
        names=("q", "k", "v", "log_decay", "initial_state"),
    )


def test_long_sequence_logsigmoid_decay():
    """T = 1000 (16 chunks, padded), realistic decays; forward and backward."""
    seed = testing.fresh_seed()
    B, T, H, K, V = 1, 1000, 2, 16, 16
    q, k, v, _, s0, _ = _inputs(seed, B, T, H, H, K, V, "none", jnp.float32)
    g = jax.nn.log_sigmoid(2.0 + jax.random.normal(jax.random.key(seed + 7), (B, T, H)))

    def run(impl):
        return jax.jit(
            lambda q, k, v, g, s0: linear_attention(
                q, k, v, g, initial_state=s0, return_final_state=True, implementation=impl
            )
        )

    testing.check_against(
        run("pallas_triton"),
        run("naive"),
        (q, k, v, g, s0),
        argnums=(0, 1, 2, 3, 4),
        tol=1e-5,
        seed=seed,
        names=("q", "k", "v", "log_decay", "initial_state"),
    )


def test_chunk_size_must_suit_triton():
    q = jnp.zeros((1, 8, 1, 16))
    with pytest.raises(NotImplementedError, match="chunk_size"):
        linear_attention(q, q, q, chunk_size=24, implementation="pallas_triton")


@pytest.mark.parametrize("decay,normalize", [("none", True), ("scalar", False), ("channel", False)])
def test_step_repeated_equals_full_op(decay, normalize):
    """T steps of the decoding kernel give the outputs and final state of the full op."""
    seed = testing.fresh_seed()
    B, T, Hqk, Hv, K, V = 2, 3, 1, 2, 16, 24
    q, k, v, g, s0, _ = _inputs(
        seed, B, T, Hqk, Hv, K, V, decay, jnp.float32, decay_range=(-3.0, 0.0), normalize=normalize
    )
    o_ref, final_ref = linear_attention(
        q,
        k,
        v,
        g,
        initial_state=s0,
        return_final_state=True,
        normalize=normalize,
        implementation="naive",
    )
    state, outs = s0, []
    for t in range(T):
        o, state = linear_attention_step(
            q[:, t],
            k[:, t],
            v[:, t],
            state,
            None if g is None else g[:, t],
            normalize=normalize,
            implementation="pallas_triton",
        )
        outs.append(o)
    testing.assert_close(jnp.stack(outs, 1), o_ref, 1e-5, f"outputs (seed {seed})")
    testing.assert_close(state, final_ref, 1e-5, f"final state (seed {seed})")


# --- lowering for the H200 (nothing runs) ----------------------------------------------------


@pytest.mark.parametrize(
    "decay,D,segments",
    [
        ("scalar", 128, False),
        ("channel", 128, False),
        ("scalar", 64, True),
        ("channel", 256, True),
        ("none", 256, False),
    ],
)
def test_lowers_for_gpu(decay, D, segments):
    """Forward and backward at [2, 4096, 16, D] bf16 lower to Triton for an H200."""
    B, T, H = 2, 4096, 16
    x = jnp.zeros((B, T, H, D), jnp.bfloat16)
    g = {"none": None, "scalar": jnp.zeros((B, T, H)), "channel": jnp.zeros((B, T, H, D))}[decay]
    s0 = jnp.zeros((B, H, D, D))
    runs = jnp.zeros((B, T), jnp.int32) if segments else None

    def fwd_bwd(q, k, v, g, s0):
        def f(q, k, v, g, s0):
            return triton_module.linear_attention(
                q, k, v, g, scale=D**-0.5, initial_state=s0, runs=runs
            )

        out, vjp = jax.vjp(f, q, k, v, g, s0)
        return out, vjp(out)

    with interpret(False):
        text = testing.lower_for(fwd_bwd, x, x, x, g, s0, platform="cuda")
    for kernel in ("chunk_states", "chunk_output", "chunk_state_grads", "chunk_dv", "chunk_dqk"):
        assert f"linear_attention_{kernel}" in text


@pytest.mark.parametrize(
    "B,T,decay,segments,fused",
    [
        (1, 65536, "scalar", False, False),
        (1, 65536, "scalar", False, True),
        (1, 8192, "channel", True, False),
    ],
)
def test_two_level_lowers_for_gpu(B, T, decay, segments, fused):
    """Forward and backward with ``state_segments="auto"`` (and the fused forward) at
    [B, T, 16, 128] bf16 lower to Triton for an H200 (P = 9 segments at T = 65536)."""
    H, D = 16, 128
    x = jnp.zeros((B, T, H, D), jnp.bfloat16)
    g = jnp.zeros((B, T, H)) if decay == "scalar" else jnp.zeros((B, T, H, D))
    s0 = jnp.zeros((B, H, D, D))
    runs = jnp.zeros((B, T), jnp.int32) if segments else None
    config = {"state_segments": "auto", "fused_forward": fused}
    plan = triton_module.make_plan(x, x, g, s0, runs, scale=1.0, chunk_size=64, config=config)
    assert plan.segments > 1

    def fwd_bwd(q, k, v, g, s0):
        def f(q, k, v, g, s0):
            return triton_module.linear_attention(
                q, k, v, g, scale=D**-0.5, initial_state=s0, runs=runs, config=config
            )

        out, vjp = jax.vjp(f, q, k, v, g, s0)
        return out, vjp(out)

    with interpret(False):
        text = testing.lower_for(fwd_bwd, x, x, x, g, s0, platform="cuda")
    forward = "fused_forward" if fused else "chunk_output"
    for kernel in (
        "chunk_states",
        "combine_segments",
        forward,
        "chunk_state_grads",
        "chunk_dv",
        "chunk_dqk",
    ):
        assert f"linear_attention_{kernel}" in text


def test_fused_forward_lowers_for_gpu():
    """The fused forward without segments at [8, 4096, 16, 128] bf16 (one pass, 256
    programs), with runs and an initial state."""
    B, T, H, D = 8, 4096, 16, 128
    x = jnp.zeros((B, T, H, D), jnp.bfloat16)
    runs = jnp.zeros((B, T), jnp.int32)
    with interpret(False):
        text = testing.lower_for(
            lambda q, k, v, g, s0: triton_module.linear_attention(
                q,
                k,
                v,
                g,
                scale=D**-0.5,
                initial_state=s0,
                runs=runs,
                config={"fused_forward": True},
            ),
            x,
            x,
            x,
            jnp.zeros((B, T, H)),
            jnp.zeros((B, H, D, D)),
            platform="cuda",
        )
    assert "linear_attention_fused_forward" in text
    assert "linear_attention_chunk_output" not in text


def test_step_lowers_for_gpu():
    B, H, D = 8, 16, 128
    x = jnp.zeros((B, H, D), jnp.bfloat16)
    with interpret(False):
        text = testing.lower_for(
            lambda q, k, v, s, g: step_module.linear_attention_step_triton(
                q, k, v, s, g, scale=0.1
            ),
            x,
            x,
            x,
            jnp.zeros((B, H, D, D)),
            jnp.zeros((B, H)),
            platform="cuda",
        )
    assert "linear_attention_step" in text
