"""Run by the sequence-parallel tests in a subprocess with 8 CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=8``):

    python tests/parallel/sequence_runner.py layers SEED [all]
    python tests/parallel/sequence_runner.py ops SEED

``layers``: every mixer case of ``tests/layers/cases.py`` (causal, with ``seq`` in {2, 4, 8}
with ``all``, else with one of them, chosen by the case's index and the seed so that every
value serves several mixers in each run and every pair comes up across runs; and the
bidirectional form of two, with ``seq = 4``), on packed rows whose segments cross
device boundaries, once on one device and once under an active mesh ``data x fsdp x seq``:
the relative errors of the output and of every gradient (parameters and input), and
whether the traced step holds a ``shard_map`` (the context-parallel form was taken). Where an
error exceeds 1e-5, also ``spread``: the same errors between two single-device
implementations (``naive`` against the default), float32's noise floor for each array
(see the test); otherwise ``spread`` is None (not computed: it costs a compilation). ``ops``: the context-parallel ops
against the kernel ops on shapes the layers do not reach (odd block lengths, long windows,
initial and final states, log-sum-exp). Prints one JSON line ``RESULT {...}``.
"""

from __future__ import annotations

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "layers"))

from cases import CASES, config_for  # noqa: E402

from seqmix import kernels, parallel  # noqa: E402
from seqmix.models import build_mixer  # noqa: E402
from seqmix.testing import relative_error  # noqa: E402

B, T = 2, 32
SEQS = (2, 4, 8)
BIDIRECTIONAL = ("attention", "gla")  # case ids also run with causal=False, at seq = 4


def mesh_for(seq: int) -> Mesh:
    data = 8 // seq if B % (8 // seq) == 0 else 1
    data = min(data, B)
    devices = np.asarray(jax.devices()[: data * seq]).reshape(data, 1, seq)
    return Mesh(devices, ("data", "fsdp", "seq"))


def packed_ids(rng) -> np.ndarray:
    """Two rows of 3-4 segments with random cut points (crossing device blocks)."""
    rows = []
    for _ in range(B):
        cuts = np.sort(rng.choice(np.arange(1, T), size=rng.integers(2, 4), replace=False))
        ids = np.zeros(T, np.int32)
        for c in cuts:
            ids[c:] += 1
        rows.append(ids + 3)
    return np.stack(rows)


def errors(got, ref) -> list[float]:
    return [relative_error(a, b) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref))]


def run_layers(seed: int, every_seq: bool) -> dict:
    rng = np.random.default_rng(seed)
    out = {}
    x = jnp.asarray(rng.normal(size=(B, T, 32)), jnp.float32)
    ids = jnp.asarray(packed_ids(rng))
    cot = jnp.asarray(rng.normal(size=(B, T, 32)), jnp.float32)
    jobs = [
        (cid, name, over, True, SEQS if every_seq else (SEQS[(i + seed) % len(SEQS)],))
        for i, (cid, name, over) in enumerate(CASES)
    ]
    jobs += [(cid, name, over, False, (4,)) for cid, name, over in CASES if cid in BIDIRECTIONAL]
    for cid, name, over, causal, seqs in jobs:

        def build(**model):
            # norm_eps 1e-2: an output RMS norm of a near-zero vector (a segment's first token
            # with q.k ~ 0) would otherwise amplify float32 rounding far past the tolerance.
            config = config_for(name, over, norm_eps=1e-2, **model)
            return nnx.split(build_mixer(name, config, causal=causal, rngs=nnx.Rngs(seed)))

        graphdef, params = build()
        graphdef_naive, _ = build(implementation="naive")

        def step_of(graphdef):
            def loss(params, x):
                y = nnx.merge(graphdef, params)(x, segment_ids=ids)
                return jnp.sum(y * cot), y

            return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)

        step = step_of(graphdef)
        (_, y_ref), g_ref = jax.jit(step)(params, x)
        spread = None

        def noise_floor():
            (_, y_naive), g_naive = jax.jit(step_of(graphdef_naive))(params, x)
            return {"output": relative_error(y_naive, y_ref), "grads": errors(g_naive, g_ref)}

        key = cid if causal else cid + "-bidirectional"
        for seq in seqs:
            with jax.set_mesh(mesh_for(seq)):
                (_, y), g = jax.jit(step)(params, x)
                routed = "shard_map" in str(jax.make_jaxpr(step)(params, x))
            result = {"output": relative_error(y, y_ref), "grads": errors(g, g_ref)}
            if spread is None and max(result["output"], *result["grads"]) >= 1e-5:
                spread = noise_floor()
            out[f"{key}/seq={seq}"] = dict(result, routed=routed, spread=spread)
    return out


def run_ops(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    out = {}

    def normal(*shape):
        return jnp.asarray(rng.normal(size=shape), jnp.float32)

    def compare(name, ref_fn, cp_fn, args, mesh):
        def loss(fn):
            def f(*a):
                res = fn(*a)
                leaves = jax.tree.leaves(res)
                return sum(jnp.sum(jnp.sin(1.0 + i + r)) for i, r in enumerate(leaves)), res

            return jax.value_and_grad(f, argnums=tuple(range(len(args))), has_aux=True)

        (_, r), gr = jax.jit(loss(ref_fn))(*args)
        with jax.set_mesh(mesh):
            (_, c), gc = jax.jit(loss(cp_fn))(*args)
        out[name] = {"outputs": errors(c, r), "grads": errors(gc, gr)}

    mesh8 = mesh_for(8)

    def causal_case(name, segs, mesh):
        def run(attention):
            return lambda q, k, v: attention(
                q, k, v, causal=True, segment_ids=segs, return_lse=True
            )

        tag = "segments" if segs is not None else "plain"
        compare(
            f"attention/{name}/{tag}",
            run(kernels.attention),
            run(parallel.attention),
            (q, k, v),
            mesh,
        )

    # odd block length (3 tokens per device): the contiguous causal schedule
    q, k, v = normal(1, 24, 4, 8), normal(1, 24, 2, 8), normal(1, 24, 2, 8)
    ids = jnp.asarray(np.repeat([0, 1, 2], [7, 9, 8])[None], jnp.int32)
    for segs in (None, ids):
        causal_case("odd-block", segs, mesh8)
    # the zig-zag schedule (even blocks): each device's own chunk pair in one causal call,
    # segments crossing chunks and devices; GQA
    q, k, v = normal(2, 32, 4, 8), normal(2, 32, 2, 8), normal(2, 32, 2, 8)
    ids5 = jnp.asarray(np.stack([np.repeat([0, 1, 2], [5, 14, 13]), np.repeat([7, 8], [22, 10])]))
    for seq, segs in ((2, None), (4, ids5), (8, ids5)):
        causal_case(f"zigzag-seq-{seq}", segs, mesh_for(seq))
    # a window longer than a device's block (halo from several devices), softcap, MQA
    q, k, v = normal(2, 32, 4, 8), normal(2, 32, 1, 8), normal(2, 32, 1, 8)
    compare(
        "attention/window-9-over-blocks-of-4",
        lambda q, k, v: kernels.attention(q, k, v, causal=True, local_window_size=9, softcap=3.0),
        lambda q, k, v: parallel.attention(q, k, v, causal=True, local_window_size=9, softcap=3.0),
        (q, k, v),
        mesh8,
    )
    compare(
        "attention/bidirectional-window-(2,5)",
        lambda q, k, v: kernels.attention(q, k, v, local_window_size=(2, 5), return_lse=True),
        lambda q, k, v: parallel.attention(q, k, v, local_window_size=(2, 5), return_lse=True),
        (q, k, v),
        mesh8,
    )
    # windows that fit in a block (blocks of 8): the block's own call plus edge calls,
    # with packed segments across the block boundaries
    ids4 = jnp.asarray(np.stack([np.repeat([0, 1, 2], [7, 10, 15]), np.repeat([3, 4], [9, 23])]))
    for name, kw in (
        ("bidirectional-window-(2,5)-in-block", dict(local_window_size=(2, 5))),
        ("causal-window-6-in-block", dict(causal=True, local_window_size=6)),
    ):
        compare(
            f"attention/{name}/segments",
            lambda q, k, v, kw=kw: kernels.attention(
                q, k, v, segment_ids=ids4, return_lse=True, **kw
            ),
            lambda q, k, v, kw=kw: parallel.attention(
                q, k, v, segment_ids=ids4, return_lse=True, **kw
            ),
            (q, k, v),
            mesh_for(4),
        )
    # linear attention: initial and final states, per-channel decay, groups, segments
    ids2 = jnp.asarray(np.stack([np.repeat([0, 1], [13, 19]), np.repeat([4, 5, 6], [3, 20, 9])]))
    q, k, v = normal(2, 32, 2, 4), normal(2, 32, 2, 4), normal(2, 32, 4, 3)
    g = -jnp.abs(normal(2, 32, 4, 4))
    s0 = normal(2, 4, 4, 3)
    compare(
        "linear_attention/states-channel-decay-segments",
        lambda q, k, v, g, s0: kernels.linear_attention(
            q, k, v, g, initial_state=s0, return_final_state=True, segment_ids=ids2, chunk_size=4
        ),
        lambda q, k, v, g, s0: parallel.linear_attention(
            q, k, v, g, initial_state=s0, return_final_state=True, segment_ids=ids2, chunk_size=4
        ),
        (q, k, v, g, s0),
        mesh_for(4),
    )
    # the gated delta rule: initial and final states, decay, grouped value heads, segments
    q, k = normal(2, 32, 1, 4), normal(2, 32, 1, 4)
    q, k = (x / jnp.linalg.norm(x, axis=-1, keepdims=True) for x in (q, k))
    v, s0 = normal(2, 32, 2, 3), normal(2, 2, 4, 3)
    beta = jax.nn.sigmoid(normal(2, 32, 2))
    g = -jnp.abs(normal(2, 32, 2)) / 4
    ids3 = jnp.asarray(np.stack([np.repeat([0, 1], [16, 16]), np.repeat([4, 5, 6], [3, 20, 9])]))
    compare(
        "gated_delta_rule/states-decay-groups-segments",
        lambda q, k, v, beta, g, s0: kernels.gated_delta_rule(
            q,
            k,
            v,
            beta,
            g,
            initial_state=s0,
            return_final_state=True,
            segment_ids=ids3,
            chunk_size=4,
        ),
        lambda q, k, v, beta, g, s0: parallel.gated_delta_rule(
            q,
            k,
            v,
            beta,
            g,
            initial_state=s0,
            return_final_state=True,
            segment_ids=ids3,
            chunk_size=4,
        ),
        (q, k, v, beta, g, s0),
        mesh_for(4),
    )
    # selective scan with every input, initial and final states
    u, dl, z = normal(2, 32, 6), normal(2, 32, 6), normal(2, 32, 6)
    A, D, bias = -jnp.exp(normal(6, 4)), normal(6), normal(6)
    Bm, Cm, h0 = normal(2, 32, 2, 4), normal(2, 32, 2, 4), normal(2, 6, 4)

    def scan(op):
        return lambda *a: op(
            *a[:7],
            delta_bias=a[7],
            delta_softplus=True,
            initial_state=a[8],
            return_final_state=True,
        )

    compare(
        "selective_scan/states",
        scan(kernels.selective_scan),
        scan(parallel.selective_scan),
        (u, dl, A, Bm, Cm, D, z, bias, h0),
        mesh8,
    )
    # conv wider than a block: halo from several devices, initial and final states
    x, w, b, st = normal(2, 16, 5), normal(4, 5), normal(5), normal(2, 3, 5)

    def conv(op):
        return lambda *a: op(*a[:3], activation="silu", initial_state=a[3], return_final_state=True)

    compare(
        "causal_conv1d/width-4-blocks-of-2",
        conv(kernels.causal_conv1d),
        conv(parallel.causal_conv1d),
        (x, w, b, st),
        mesh8,
    )
    return out


def main(mode: str, seed: int, every_seq: bool = False) -> None:
    assert len(jax.devices()) == 8, jax.devices()
    result = run_layers(seed, every_seq) if mode == "layers" else run_ops(seed)
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3:] == ["all"])
