"""Context parallelism: every mixer and op split over a ``seq`` mesh axis equals the
single-device result (float32, outputs and every gradient, packed segments crossing the
devices' blocks). The 8 devices are CPU devices of a subprocess (``sequence_runner.py``)."""

from __future__ import annotations

import functools
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh

from seqmix import kernels, parallel, testing
from seqmix.testing import fresh_seed

HERE = pathlib.Path(__file__).parent
TOL = 1e-5  # float32, relative
# Where two single-device implementations (naive and the default) already differ by more
# (a gradient summed over every token with cancellation, e.g. Mamba-2's A_log and dt_bias:
# up to 2.4e-5 over 40 seeds), the bound is twice that spread; the spread itself must stay
# under the layers' own 1e-4 (tests/layers/test_mixers.py).
SPREAD_FACTOR, MAX_SPREAD = 2.0, 1e-4
# Compile time dominates these tiny programs; XLA's cheapest CPU pipeline keeps the suite fast.
XLA_FLAGS = (
    "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
    "--xla_llvm_disable_expensive_passes=true"
)


def run_subprocess(script: pathlib.Path, *args: str, timeout: int = 600) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=XLA_FLAGS)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parents[1]), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, str(script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.split("RESULT ")[-1])


# Every mixer at every seq in {2, 4, 8} takes ~26 compilations (about 1.5 CPU minutes); by
# default each mixer runs at one seq value that rotates with the seed (all three values are
# covered in every run, every pair across runs). SEQMIX_SEQUENCE_PARALLEL_ALL=1 runs them all.
EVERY_SEQ = os.environ.get("SEQMIX_SEQUENCE_PARALLEL_ALL", "0") == "1"


@pytest.fixture(scope="module")
def layer_errors():
    seed = fresh_seed()
    extra = ["all"] if EVERY_SEQ else []
    return seed, run_subprocess(HERE / "sequence_runner.py", "layers", str(seed), *extra)


@pytest.fixture(scope="module")
def op_errors():
    seed = fresh_seed()
    return seed, run_subprocess(HERE / "sequence_runner.py", "ops", str(seed))


def test_every_mixer_matches_one_device_for_seq_2_4_8(layer_errors):
    seed, results = layer_errors
    from layers.cases import IDS  # a case for every registered mixer

    for case in IDS:
        ran = [seq for seq in (2, 4, 8) if f"{case}/seq={seq}" in results]
        assert ran == [2, 4, 8] if EVERY_SEQ else len(ran) == 1, f"{case}: ran seq {ran}"
    for seq in (2, 4, 8):
        assert any(key.endswith(f"/seq={seq}") for key in results), f"no mixer ran seq={seq}"
    assert "attention-bidirectional/seq=4" in results and "gla-bidirectional/seq=4" in results
    for key, r in results.items():
        assert r["routed"], f"{key}: the step has no shard_map (the plain op ran)"
        errs = [r["output"], *r["grads"]]
        spread = r["spread"] or {"output": 0.0, "grads": [0.0] * len(r["grads"])}
        spreads = [spread["output"], *spread["grads"]]
        for i, (err, spread) in enumerate(zip(errs, spreads)):
            what = "output" if i == 0 else f"gradient {i - 1}"
            assert spread < MAX_SPREAD, f"{key} (seed {seed}): naive vs default {what} {spread}"
            bound = max(TOL, SPREAD_FACTOR * spread)
            assert np.isfinite(err) and err < bound, (
                f"{key} (seed {seed}): {what} error {err:.2e} >= {bound:.1e} "
                f"(errors {[f'{e:.1e}' for e in errs]})"
            )


def test_ops_match_the_kernel_ops_on_edge_shapes(op_errors):
    seed, results = op_errors
    expected = {
        "attention/odd-block/plain",
        "attention/odd-block/segments",
        "attention/zigzag-seq-2/plain",
        "attention/zigzag-seq-4/segments",
        "attention/zigzag-seq-8/segments",
        "attention/window-9-over-blocks-of-4",
        "attention/bidirectional-window-(2,5)",
        "attention/bidirectional-window-(2,5)-in-block/segments",
        "attention/causal-window-6-in-block/segments",
        "linear_attention/states-channel-decay-segments",
        "gated_delta_rule/states-decay-groups-segments",
        "selective_scan/states",
        "causal_conv1d/width-4-blocks-of-2",
    }
    assert set(results) == expected
    for key, r in results.items():
        for what in ("outputs", "grads"):
            worst = max(r[what])
            assert np.isfinite(worst) and worst < TOL, f"{key} (seed {seed}): {what} {r[what]}"


# --- in this process (one device): routing and argument errors ---------------------------


def test_without_a_sequence_axis_the_ops_are_the_kernel_ops():
    q = jax.random.normal(jax.random.key(fresh_seed()), (1, 8, 2, 4))
    plain = kernels.attention(q, q, q, causal=True)
    np.testing.assert_array_equal(parallel.attention(q, q, q, causal=True), plain)
    one = AbstractMesh((1, 1), ("data", "seq"))
    np.testing.assert_array_equal(parallel.attention(q, q, q, causal=True, mesh=one), plain)
    assert parallel.sequence_parallel_size(one) == 1
    assert parallel.sequence_parallel_size(AbstractMesh((4,), ("seq",))) == 4
    assert "shard_map" not in str(jax.make_jaxpr(lambda q: parallel.attention(q, q, q))(q))


def test_length_not_divisible_by_the_axis_names_the_argument():
    mesh = AbstractMesh((3,), ("seq",))
    x = jnp.zeros((1, 8, 2, 4))
    with pytest.raises(
        ValueError, match=r"q: the sequence length 8 .* 3 devices of mesh axis 'seq'"
    ):
        parallel.attention(x, x, x, causal=True, mesh=mesh)
    with pytest.raises(ValueError, match=r"q: the sequence length 8"):
        parallel.linear_attention(x, x, x, mesh=mesh)
    with pytest.raises(ValueError, match=r"u: the sequence length 8"):
        parallel.selective_scan(
            x[..., 0], x[..., 0], jnp.zeros((2, 3)), x[:, :, 0, :3], x[:, :, 0, :3], mesh=mesh
        )
    with pytest.raises(ValueError, match=r"x: the sequence length 8"):
        parallel.causal_conv1d(x[..., 0], jnp.zeros((4, 2)), mesh=mesh)


def test_scan_reduction_by_the_triton_kernel_in_the_per_device_program():
    """``selective_scan_local(reduction="pallas_triton")`` inside ``shard_map`` (a ``seq``
    axis of one device; the kernel in interpret mode) gives the XLA reduction's output and
    gradients; the default follows the scan's implementation; an unknown reduction, or the
    kernel without a GPU or interpret mode, raises naming ``reduction``."""
    from jax.sharding import PartitionSpec as P

    from seqmix.kernels import dispatch
    from seqmix.parallel.mesh import SEQ_AXIS, shard_over_sequence
    from seqmix.parallel.selective_scan import selective_scan_local

    ks = jax.random.split(jax.random.key(fresh_seed()), 5)
    B, T, Dm, N = 1, 24, 8, 4
    u, delta = jax.random.normal(ks[0], (B, T, Dm)), jax.random.normal(ks[1], (B, T, Dm))
    A = -jnp.exp(jax.random.normal(ks[2], (Dm, N)))
    Bm, Cm = jax.random.normal(ks[3], (B, T, N)), jax.random.normal(ks[4], (B, T, N))
    mesh = jax.make_mesh(
        (1,), (SEQ_AXIS,), devices=jax.devices()[:1], axis_types=(jax.sharding.AxisType.Auto,)
    )
    tok = P(None, SEQ_AXIS)

    def grads(reduction):
        def local(u, delta, A, Bm, Cm):
            return selective_scan_local(
                *(u, delta, A, Bm, Cm, None, None),
                axis=SEQ_AXIS,
                delta_softplus=True,
                reduction=reduction,
            )

        f = shard_over_sequence(local, mesh, (tok, tok, P(), tok, tok), (tok, P()))

        def loss(*a):  # the final state (the reduction's value) enters the loss too
            y, final = f(*a)
            return jnp.sum(jnp.sin(y)) + jnp.sum(jnp.cos(final))

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4)))(u, delta, A, Bm, Cm)

    with dispatch.interpret():
        got = grads("pallas_triton")
    want = grads("xla")
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(jnp.abs(b).max()))
    # None follows the scan's implementation: the kernel where the scan's is named
    from seqmix.parallel.selective_scan import _reduction

    with dispatch.interpret():
        assert _reduction(None, "pallas_triton") == "pallas_triton"
        assert _reduction(None, None) == _reduction(None, "xla") == "xla"
    x = jnp.zeros((1, 8, 2))
    with pytest.raises(ValueError, match="reduction must be"):
        parallel.selective_scan(x, x, jnp.zeros((2, 3)), x[..., :1], x[..., :1], reduction="cub")
    with dispatch.interpret(False), pytest.raises(NotImplementedError, match="reduction="):
        parallel.selective_scan(
            x, x, jnp.zeros((2, 3)), x[..., :1], x[..., :1], reduction="pallas_triton"
        )


def test_one_sided_bidirectional_window_is_not_implemented():
    mesh = AbstractMesh((2,), ("seq",))
    x = jnp.zeros((1, 8, 2, 4))
    with pytest.raises(NotImplementedError, match="bounded on one side"):
        parallel.attention(x, x, x, local_window_size=(None, 2), mesh=mesh)


def test_training_with_seq_4_follows_the_seq_1_loss_curve(tmp_path):
    """``python -m seqmix.experiments.train ... --config.mesh.seq=4`` (MQAR and the byte LM,
    small variants, same seed) gives the losses of ``--config.mesh.seq=1`` step by step."""
    runs = run_subprocess(HERE / "train_runner.py", str(tmp_path), timeout=900)
    for name, curves in runs.items():
        one, four = curves["1"], curves["4"]
        assert len(one) == len(four) == 3, (name, curves)
        assert len(set(one)) == 3, f"{name}: the loss did not change ({one})"
        np.testing.assert_allclose(four, one, rtol=1e-5, err_msg=name)


def test_backward_chunk_fills_its_byte_budget():
    """The reduction backward's tokens per step: the largest power of two within the byte
    budget, at least 16 tokens, at most the block."""
    from seqmix.parallel.selective_scan import backward_chunk

    # 32k tokens of Mamba-1 at d_model 768 (Dm 1536, N 16): 96 KiB per token in float32
    assert backward_chunk(1, 32768, 1536, 16, budget=128 << 20) == 1024
    assert backward_chunk(1, 32768, 1536, 16, budget=96 << 10) == 16  # the floor
    assert backward_chunk(2, 37, 8, 4, budget=1 << 20) == 37  # the whole block


@pytest.mark.parametrize(
    "T, groups, reduction",
    [
        pytest.param(37, 2, "xla", id="groups"),
        pytest.param(300, None, "xla", id="chunks"),
        pytest.param(37, 2, "pallas_triton", id="triton-groups", marks=pytest.mark.gpu),
        pytest.param(45, None, "pallas_triton", id="triton", marks=pytest.mark.gpu),
    ],
)
def test_block_final_state_is_the_scan_final_state_with_its_gradients(
    T, groups, reduction, monkeypatch
):
    """The scan's per-device reduction against the recurrence's final state: values and
    gradients, by the XLA backward (300 tokens under a byte budget of 128 tokens: its loop
    over chunks, the last one padded) and by the Triton kernel, in interpret mode on the CPU
    and natively with ``pytest -m gpu`` (a partial last tile of tokens; two groups of B over
    channel blocks of 4)."""
    import importlib

    from seqmix.kernels import dispatch

    selective_scan = importlib.import_module("seqmix.parallel.selective_scan")  # the module
    block_final_state = functools.partial(selective_scan.block_final_state, reduction=reduction)

    B, Dm, N = 2, 8, 4
    monkeypatch.setattr(selective_scan, "_CHUNK_BYTES", 128 * 4 * B * Dm * N)
    assert selective_scan.backward_chunk(B, T, Dm, N) == min(T, 128)
    ks = jax.random.split(jax.random.key(fresh_seed()), 5)
    u = jax.random.normal(ks[0], (B, T, Dm))
    dt = jax.nn.softplus(jax.random.normal(ks[1], (B, T, Dm)))
    Bm = jax.random.normal(ks[2], (B, T, groups, N) if groups else (B, T, N))
    A = -jnp.exp(jax.random.normal(ks[3], (Dm, N)))
    w = jax.random.normal(ks[4], (B, Dm, N))

    def mine(dt, u, Bm, A):
        return jnp.sum(w * block_final_state(dt, u, Bm, A))

    def scan(dt, u, Bm, A):
        _, final = kernels.selective_scan(
            u, dt, A, Bm, Bm, return_final_state=True, implementation="naive"
        )
        return jnp.sum(w * final)

    args = (dt, u, Bm, A)
    # the sum cancels: its tolerance is relative to the terms' magnitude, not to the sum's
    scale = float(jnp.sum(jnp.abs(w * block_final_state(*args))))
    np.testing.assert_allclose(mine(*args), scan(*args), rtol=1e-5, atol=1e-6 * scale)
    with dispatch.interpret(reduction == "pallas_triton" and not testing.native_run()):
        grads = jax.grad(mine, argnums=(0, 1, 2, 3))(*args)
    for name, a, b in zip(
        ("dt", "u", "B", "A"), grads, jax.grad(scan, argnums=(0, 1, 2, 3))(*args)
    ):
        np.testing.assert_allclose(
            a, b, rtol=1e-4, atol=1e-5 * float(jnp.abs(b).max()), err_msg=name
        )
