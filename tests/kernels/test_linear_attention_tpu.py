"""linear_attention and linear_attention_step with implementation="pallas_tpu" (Mosaic TPU
kernels, run in interpret mode with race detection) against the naive oracle on fresh random
inputs: outputs, final states and every gradient (q, k, v, log_decay, initial_state). Plus
lowering of forward and backward for a TPU at a realistic shape."""

import jax
import jax.numpy as jnp
import pytest

from seqmix import testing
from seqmix.kernels import interpret
from seqmix.kernels.linear_attention import linear_attention, linear_attention_step, reference, tpu
from seqmix.kernels.linear_attention.api import segment_runs

# The interpreted kernels are large programs that run once: compile them without the
# backend's optimisation passes (about half the test time).
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _check(fn, ref, args, *, argnums, tol, seed, names, grad_tols=None):
    """``testing.check_against`` with each side's outputs and VJP in one top-level jit
    (compiler options apply only there): outputs and every gradient within ``tol`` (or
    ``grad_tols[name]``)."""

    def out_and_grads(f, args):
        def run(diff, ct):
            def closed(*d):
                full = list(args)
                for i, a in zip(argnums, d):
                    full[i] = a
                return f(*full)

            out, vjp = jax.vjp(closed, *diff)
            return out, vjp(ct)

        return jax.jit(run, compiler_options=FAST_COMPILE)

    ref_args = testing.upcast(list(args))  # the oracle in float32
    out_shape = jax.eval_shape(lambda: fn(*args))
    ct = testing.random_cotangent(
        jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), out_shape), jax.random.key(seed + 1)
    )
    out, grads = out_and_grads(fn, args)([args[i] for i in argnums], ct)
    out_ref, grads_ref = out_and_grads(ref, ref_args)(
        [ref_args[i] for i in argnums], testing.upcast(ct)
    )
    for i, (a, b) in enumerate(zip(jax.tree.leaves(out), jax.tree.leaves(out_ref))):
        testing.assert_close(a, b, tol, f"output {i} (seed {seed})")
    for name, a, b in zip(names, grads, grads_ref):
        testing.assert_close(a, b, (grad_tols or {}).get(name, tol), f"d{name} (seed {seed})")


def _assert_no_races():
    """The interpreter's race detector prints and records races of the last kernel run."""
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call

    races = interpret_pallas_call.races
    assert races is not None and not races.races_found, "data race in the TPU kernel"


def _jit(fn):
    return jax.jit(fn, compiler_options=FAST_COMPILE)


def _inputs(
    seed,
    *,
    B,
    T,
    Hqk,
    Hv,
    K,
    V,
    dtype,
    decay,
    min_log_decay=-3.0,
    segments=False,
    init=False,
    normalize=False,
):
    ks = jax.random.split(jax.random.key(seed), 6)
    q = jax.random.normal(ks[0], (B, T, Hqk, K), jnp.float32).astype(dtype)
    k = jax.random.normal(ks[1], (B, T, Hqk, K), jnp.float32).astype(dtype)
    if normalize:  # positive features, as normalised linear attention uses
        q, k = jnp.abs(q) + 0.1, jnp.abs(k) + 0.1
    v = jax.random.normal(ks[2], (B, T, Hv, V), jnp.float32).astype(dtype)
    g_shape = {"none": None, "scalar": (B, T, Hv), "channel": (B, T, Hv, K)}[decay]
    g = (
        None
        if g_shape is None
        else jax.random.uniform(ks[3], g_shape, jnp.float32, min_log_decay, 0.0)
    )
    vs = V + 1 if normalize else V
    s0 = jax.random.normal(ks[4], (B, Hv, K, vs), jnp.float32) if init else None
    if normalize and init:
        s0 = jnp.abs(s0)
    seg = jnp.sort(jax.random.randint(ks[5], (B, T), 0, 3), axis=1) if segments else None
    return q, k, v, g, s0, seg


def _check_public(seed, *, chunk, segments, normalize, dtype, **shape):
    q, k, v, g, s0, seg = _inputs(
        seed, segments=segments, normalize=normalize, dtype=dtype, **shape
    )
    kw = dict(segment_ids=seg, normalize=normalize, chunk_size=chunk, return_final_state=True)

    def run(impl):
        return lambda q, k, v, g, s0: linear_attention(
            q, k, v, g, initial_state=s0, implementation=impl, **kw
        )

    args = (q, k, v, g, s0)
    names = ["q", "k", "v", "log_decay", "initial_state"]
    argnums = [i for i, a in enumerate(args) if a is not None]
    with interpret():
        _check(
            run("pallas_tpu"),
            run("naive"),
            args,
            argnums=argnums,
            tol=testing.tolerance(dtype),
            seed=seed,
            names=[names[i] for i in argnums],
            grad_tols=(
                testing.NORMALIZE_GRAD_TOL.get(jnp.dtype(dtype).name) if normalize else None
            ),
        )


CASES = [
    # decay, dtype, B, T, Hqk, Hv, K, V, chunk, segments, init, normalize, min_log_decay
    ("none", jnp.float32, 2, 16, 2, 2, 16, 16, 16, False, True, False, 0.0),
    ("scalar", jnp.float32, 1, 17, 1, 2, 16, 16, 16, True, True, False, -20.0),
    ("channel", jnp.float32, 1, 33, 1, 2, 16, 16, 32, True, True, False, -20.0),
    ("none", jnp.bfloat16, 1, 40, 1, 2, 32, 32, 32, True, False, True, 0.0),
    ("scalar", jnp.bfloat16, 1, 40, 2, 4, 16, 16, 32, True, True, False, -3.0),
    ("channel", jnp.bfloat16, 1, 40, 2, 2, 16, 16, 32, True, False, True, -3.0),
    ("scalar", jnp.float16, 1, 20, 1, 1, 16, 16, 16, False, True, True, -3.0),
]


@pytest.mark.parametrize(
    "case",
    CASES,
    ids=lambda c: "-".join(str(jnp.dtype(x).name) if i == 1 else str(x) for i, x in enumerate(c)),
)
def test_matches_oracle(case):
    """Every decay kind, groups, segments, states in and out, normalize, log_decay down to
    -20 (every exp stays of a non-positive number), bf16/fp16/fp32; chunk 32 gives the
    per-channel kernel two sub-chunks (off-diagonal factored blocks)."""
    decay, dtype, B, T, Hqk, Hv, K, V, chunk, segments, init, normalize, gmin = case
    _check_public(
        testing.fresh_seed(),
        decay=decay,
        dtype=dtype,
        B=B,
        T=T,
        Hqk=Hqk,
        Hv=Hv,
        K=K,
        V=V,
        chunk=chunk,
        segments=segments,
        init=init,
        normalize=normalize,
        min_log_decay=gmin,
    )


@pytest.mark.parametrize("T, decay", [(1, "channel"), (15, "scalar")])
def test_lengths_around_the_chunk(T, decay):
    """T in {1, 15} with chunk 16 (16 and 17 are in test_matches_oracle)."""
    _check_public(
        testing.fresh_seed(),
        decay=decay,
        dtype=jnp.float32,
        B=1,
        T=T,
        Hqk=1,
        Hv=2,
        K=16,
        V=16,
        chunk=16,
        segments=T > 1,
        init=True,
        normalize=False,
    )


@pytest.mark.parametrize("decay", ["scalar", "channel"])
def test_several_grid_steps(decay):
    """Chunks of 16 (sub-chunks of 8), 8 chunks per grid step, T = 140: the state and the
    segments cross grid steps, the backward recomputes chunk states inside a block and the
    last block is partial. (The public op picks ~1024 tokens per step, so this calls the
    implementation directly with a smaller step.)"""
    seed = testing.fresh_seed()
    q, k, v, g, s0, seg = _inputs(
        seed,
        B=1,
        T=140,
        Hqk=1,
        Hv=2,
        K=16,
        V=16,
        dtype=jnp.float32,
        decay=decay,
        segments=True,
        init=True,
    )
    runs = segment_runs(seg)
    fn = lambda q, k, v, g, s0: tpu.linear_attention(
        q,
        k,
        v,
        g,
        scale=0.25,
        initial_state=s0,
        runs=runs,
        chunk_size=16,
        sub_chunk=8,
        chunks_per_step=8,
    )
    ref = lambda q, k, v, g, s0: reference.linear_attention_naive(
        q, k, v, g, scale=0.25, initial_state=s0, runs=runs
    )
    with interpret():
        jax.block_until_ready(jax.jit(fn)(q, k, v, g, s0))  # forward kernel alone
        _assert_no_races()
        _check(
            fn,
            ref,
            (q, k, v, g, s0),
            argnums=(0, 1, 2, 3, 4),
            tol=testing.tolerance(jnp.float32),
            seed=seed,
            names="qkvgs",
        )
        _assert_no_races()  # the last kernel run: the backward


@pytest.mark.parametrize(
    "decay, Hqk, Hv, normalize",
    [("none", 2, 2, True), ("scalar", 1, 2, False), ("channel", 1, 4, False)],
)
def test_step_matches_full_op(decay, Hqk, Hv, normalize):
    seed = testing.fresh_seed()
    B, T, K, V = 2, 4, 16, 24
    q, k, v, g, s0, _ = _inputs(
        seed,
        B=B,
        T=T,
        Hqk=Hqk,
        Hv=Hv,
        K=K,
        V=V,
        dtype=jnp.float32,
        decay=decay,
        init=True,
        normalize=normalize,
    )
    with interpret():
        step = _jit(
            lambda q, k, v, s, g: linear_attention_step(
                q, k, v, s, g, normalize=normalize, implementation="pallas_tpu"
            )
        )
        state, outs = s0, []
        for t in range(T):
            o, state = step(q[:, t], k[:, t], v[:, t], state, None if g is None else g[:, t])
            outs.append(o)
        _assert_no_races()
    o_ref, s_ref = linear_attention(
        q,
        k,
        v,
        g,
        initial_state=s0,
        normalize=normalize,
        return_final_state=True,
        implementation="naive",
    )
    tol = testing.tolerance(jnp.float32)
    testing.assert_close(jnp.stack(outs, axis=1), o_ref, tol, f"o (seed {seed})")
    testing.assert_close(state, s_ref, tol, f"state (seed {seed})")


def test_chunk_size_must_be_a_multiple_of_16():
    q, k, v, g, _, _ = _inputs(
        0, B=1, T=8, Hqk=1, Hv=1, K=16, V=16, dtype=jnp.float32, decay="scalar"
    )
    with interpret(), pytest.raises(NotImplementedError, match="multiple of 16"):
        linear_attention(q, k, v, g, chunk_size=24, implementation="pallas_tpu")


@pytest.mark.parametrize("decay", ["scalar", "channel"])
def test_lowers_for_tpu(decay):
    """Forward and backward of the public op lower to Mosaic at [2, 2048, 8, 128] bf16
    (segments, states in and out); so does the decoding step."""
    B, T, H, D = 2, 2048, 8, 128
    x = jnp.zeros((B, T, H, D), jnp.bfloat16)
    g = jnp.zeros((B, T, H) if decay == "scalar" else (B, T, H, D), jnp.float32)
    s0 = jnp.zeros((B, H, D, D), jnp.float32)
    seg = jnp.zeros((B, T), jnp.int32)

    def fwd_bwd(q, k, v, g, s0, seg):
        def loss(q, k, v, g, s0):
            o, s = linear_attention(
                q,
                k,
                v,
                g,
                initial_state=s0,
                segment_ids=seg,
                return_final_state=True,
                implementation="pallas_tpu",
            )
            return o.astype(jnp.float32).sum() + s.sum()

        return jax.grad(loss, argnums=(0, 1, 2, 3, 4))(q, k, v, g, s0)

    text = testing.lower_for(fwd_bwd, x, x, x, g, s0, seg, platform="tpu")
    assert text.count("tpu_custom_call") == 2  # one forward kernel, one backward kernel
    text = testing.lower_for(
        lambda q, k, v, s, g: linear_attention_step(q, k, v, s, g, implementation="pallas_tpu"),
        x[:, 0],
        x[:, 0],
        x[:, 0],
        s0,
        g[:, 0],
        platform="tpu",
    )
    assert "tpu_custom_call" in text
