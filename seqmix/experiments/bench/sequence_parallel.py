"""Programs measured by ``experiments/bench_sequence_parallel.py``: the trainer's step and one
layer of the benchmark models on a ``data x fsdp x seq`` mesh, the per-device programs of
the context-parallel ops beside their plain ops, memory accounts and profile reading.
"""

from __future__ import annotations

import contextlib
import glob
import gzip
import json
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from seqmix import kernels
from seqmix.experiments.bench.models import model_config_125m
from seqmix.kernels import dispatch
from seqmix.layers import block as block_lib
from seqmix.models import layer_names
from seqmix.parallel.attention import causal_attention_local, windowed_attention_local
from seqmix.parallel.conv1d import causal_conv1d_local
from seqmix.parallel.delta_rule import gated_delta_rule_local
from seqmix.parallel.linear_attention import linear_attention_local
from seqmix.parallel.mesh import SEQ_AXIS, shard_over_sequence
from seqmix.parallel.selective_scan import selective_scan_local
from seqmix.train import sharding, steps
from seqmix.train.config import base_config

# XLA op and NCCL kernel names of collectives in a profile (lower case).
COLLECTIVES = (
    "all-gather",
    "all_gather",
    "allgather",
    "reduce-scatter",
    "reduce_scatter",
    "reducescatter",
    "all-reduce",
    "all_reduce",
    "allreduce",
    "collective-permute",
    "collective_permute",
    "collectivepermute",
    "all-to-all",
    "alltoall",
    "nccl",
    "sendrecv",
)


def mesh_of(seq: int, devices=None):
    """A ``data=1 x fsdp=1 x seq`` mesh over the first ``seq`` devices."""
    cfg = ml_collections.ConfigDict({"data": 1, "fsdp": 1, "seq": seq})
    return sharding.make_mesh(cfg, devices=(devices or jax.devices())[:seq])


def memory_gb(compiled) -> dict:
    """XLA's account of one compiled call per device, GB: arguments, outputs, temporaries,
    aliased (donated) bytes and their total."""
    ma = compiled.memory_analysis()
    arg, out = ma.argument_size_in_bytes, ma.output_size_in_bytes
    tmp, alias = ma.temp_size_in_bytes, ma.alias_size_in_bytes
    gb = 2.0**30
    return {
        "arguments_gb": arg / gb,
        "outputs_gb": out / gb,
        "temp_gb": tmp / gb,
        "aliased_gb": alias / gb,
        "total_gb": (arg + out + tmp - alias) / gb,
    }


class TrainStep:
    """The trainer's jitted step of a benchmark model on ``mesh`` (batch 1 of ``T`` tokens;
    with ``seq > 1`` it traces the context-parallel mixers), and its abstract inputs."""

    def __init__(
        self,
        mixer: str,
        T: int,
        mesh,
        *,
        layers: int,
        d_model: int,
        vocab: int,
        implementation: str | None = None,
    ):
        self.mixer, self.T, self.mesh = mixer, T, mesh
        model = model_config_125m(mixer, T, layers=layers, d_model=d_model, vocab=vocab)
        model.implementation = implementation
        cfg = base_config(model=model)
        cfg.optimizer.warmup_steps = 10
        self.config = cfg
        self.program = steps.build_program(cfg, mesh=mesh, num_steps=1000)
        self.parts = self.program.parts
        self.abstract_batch = {
            k: jax.ShapeDtypeStruct((1, T), jnp.float32 if k == "mask" else jnp.int32)
            for k in ("inputs", "targets", "mask")
        }
        self.n_params = self.program.num_params
        self.n_attention = sum(1 for name in layer_names(cfg.model) if name == "attention")
        self.d_model = d_model

    def compile(self):
        args = self.program.abstract_args(self.abstract_batch)["train"]
        return self.program.train_step.lower(*args).compile()

    def flops_per_token(self) -> float:
        """6 N per token plus causal attention's 6 L d T (as ``bench_model``)."""
        return 6.0 * self.n_params + 6.0 * self.n_attention * self.d_model * self.T

    def concrete(self, vocab: int):
        """``(state, rngs, batch)`` on the mesh: parameters initialised on the host CPU (the
        jitted initialiser compiles slowly on a GPU) and copied into their shardings."""
        state, rngs = steps.init_state(self.program, on_host=True)
        tokens = np.random.default_rng(0).integers(0, vocab, (1, self.T + 1))
        batch = {
            "inputs": tokens[:, :-1].astype(np.int32),
            "targets": tokens[:, 1:].astype(np.int32),
            "mask": np.ones((1, self.T), np.float32),
        }
        return state, rngs, self.program.put_batch(batch)


@contextlib.contextmanager
def rematerialised_blocks():
    """Within: every ``seqmix.layers.Block`` called without a cache runs under ``nnx.remat``
    (its activations are recomputed in the backward; only block inputs are kept). The
    models have no such option; the memory mode uses this to account what it would save."""
    original = block_lib.Block.__call__
    inner = nnx.remat(lambda self, x, segment_ids: original(self, x, segment_ids=segment_ids))

    def call(self, x, *, segment_ids=None, cache=None):
        if cache is not None:
            return original(self, x, segment_ids=segment_ids, cache=cache)
        return inner(self, x, segment_ids)

    block_lib.Block.__call__ = call
    try:
        yield
    finally:
        block_lib.Block.__call__ = original


def layer_step(mixer: str, T: int, mesh, *, d_model: int, implementation: str | None = None):
    """``(jitted fn, abstract args)``: forward and backward of one block (the mixer of the
    benchmark model and its SwiGLU MLP) on ``x [1, T, d_model]`` bf16 split over ``seq``."""
    from seqmix.models import build_model

    cfg = model_config_125m(mixer, T, layers=1, d_model=d_model, vocab=256)
    cfg.implementation = implementation
    model = nnx.eval_shape(lambda: build_model(cfg, rngs=nnx.Rngs(0)))
    block = model.backbone.layers[0]
    graphdef, params = nnx.split(block)
    x_sh = NamedSharding(mesh, P(None, SEQ_AXIS))
    p_sh = jax.tree.map(lambda _: NamedSharding(mesh, P()), params)

    def loss(params, x):
        y = nnx.merge(graphdef, params)(x)
        return jnp.mean(jnp.square(y.astype(jnp.float32)))

    fn = jax.jit(jax.grad(loss, argnums=(0, 1)), in_shardings=(p_sh, x_sh))
    x = jax.ShapeDtypeStruct((1, T, d_model), jnp.bfloat16, sharding=x_sh)
    params = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), params, p_sh
    )
    return fn, (params, x)


def head_step(T: int, mesh, *, d_model: int, vocab: int):
    """``(jitted fn, abstract args)``: forward and backward of the causal LM's end (final
    norm, tied head, the trainer's cross-entropy) on hidden states ``[1, T, d_model]``
    float32 split over ``seq``: its ``[T, vocab]`` logits dominate long sequences."""
    from seqmix.models import build_model
    from seqmix.train import losses

    cfg = model_config_125m("mamba2", T, layers=1, d_model=d_model, vocab=vocab)
    model = nnx.eval_shape(lambda: build_model(cfg, rngs=nnx.Rngs(0)))
    graphdef, params = nnx.split(model)
    tok_sh = NamedSharding(mesh, P(None, SEQ_AXIS))
    p_sh = jax.tree.map(lambda _: NamedSharding(mesh, P()), params)

    def loss(params, h, targets):
        backbone = nnx.merge(graphdef, params).backbone
        logits = backbone.embed.attend(backbone.final_norm(h).astype(jnp.bfloat16))
        sums = losses.token_sums(logits, targets, jnp.ones(targets.shape, jnp.float32))
        return sums["loss_sum"] / sums["count"]

    fn = jax.jit(jax.grad(loss, argnums=(0, 1)), in_shardings=(p_sh, tok_sh, tok_sh))
    abstract = (
        jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), params, p_sh),
        jax.ShapeDtypeStruct((1, T, d_model), jnp.float32, sharding=tok_sh),
        jax.ShapeDtypeStruct((1, T), jnp.int32, sharding=tok_sh),
    )
    return fn, abstract


def concrete_like(tree, seed: int = 0):
    """Random arrays (normal, scaled 0.02) with the shapes, dtypes and shardings of ``tree``."""
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    out = [
        jax.device_put(0.02 * jax.random.normal(k, a.shape, jnp.float32), a.sharding).astype(
            a.dtype
        )
        for k, a in zip(keys, leaves)
    ]
    return treedef.unflatten(out)


# --- one device: the context-parallel per-device programs against the plain ops ---------------


def overhead_cases(T: int, d_model: int = 768) -> dict[str, tuple[Callable, Callable, tuple]]:
    """``name -> (plain op, per-device program, args)`` at the 125M models' shapes (bf16,
    batch 1, ``T`` tokens): the plain op is ``seqmix.kernels``'; the per-device program is
    what every device runs at ``seq > 1`` (exchanges included), here on a ``seq`` axis of one
    device so that its collectives move nothing."""
    ks = iter(jax.random.split(jax.random.key(0), 32))
    bf = jnp.bfloat16

    def normal(*shape, scale=1.0, dtype=bf):
        return (scale * jax.random.normal(next(ks), shape, jnp.float32)).astype(dtype)

    H, D = d_model // 64, 64
    cases = {}
    q, k, v = normal(1, T, H, D), normal(1, T, H, D), normal(1, T, H, D)
    attn = dict(softcap=None, scale=D**-0.5)
    # Causal attention as ``parallel.attention`` runs it without ``return_lse`` (on one
    # device, the op itself), then with the log-sum-exp that every device's merges need when
    # the axis has more than one: the same schedule, but no longer a call cuDNN serves.
    for name, lse in (("attention", False), ("attention_lse", True)):
        cases[name] = (
            lambda q, k, v: kernels.attention(q, k, v, causal=True),
            lambda q, k, v, lse=lse: causal_attention_local(
                q, k, v, axis=SEQ_AXIS, return_lse=lse, **attn
            )[0],
            (q, k, v),
        )
    cases["attention_window_64"] = (
        lambda q, k, v: kernels.attention(q, k, v, causal=True, local_window_size=64),
        lambda q, k, v: windowed_attention_local(
            q, k, v, axis=SEQ_AXIS, left=64, right=0, causal=True, return_lse=False, **attn
        )[0],
        (q, k, v),
    )
    # GLA: per-channel decay, H heads of 64.
    g = jax.nn.log_sigmoid(normal(1, T, H, D, dtype=jnp.float32)) / 16
    cases["gla"] = (
        lambda q, k, v, g: kernels.linear_attention(q, k, v, g),
        lambda q, k, v, g: linear_attention_local(q, k, v, g, axis=SEQ_AXIS, scale=D**-0.5)[0],
        (q, normal(1, T, H, D, scale=D**-0.5), v, g),
    )
    # Mamba-2 SSD: 1 group of N = 128, 2 d_model / 64 heads of 64, scalar decay.
    Hm = 2 * d_model // 64
    C, Bm = normal(1, T, 1, 128), normal(1, T, 1, 128, scale=128**-0.5)
    xv = normal(1, T, Hm, 64)
    gm = -jax.nn.softplus(normal(1, T, Hm, dtype=jnp.float32)) * 0.1
    cases["mamba2_ssd"] = (
        lambda c, b, x, g: kernels.linear_attention(c, b, x, g, scale=1.0),
        lambda c, b, x, g: linear_attention_local(c, b, x, g, axis=SEQ_AXIS, scale=1.0)[0],
        (C, Bm, xv, gm),
    )
    # Mamba-2's conv over x, B, C.
    conv_c = 2 * d_model + 2 * 128
    w = normal(4, conv_c, scale=0.5, dtype=jnp.float32)
    cases["conv1d"] = (
        lambda x, w: kernels.causal_conv1d(x, w.astype(x.dtype), activation="silu"),
        lambda x, w: causal_conv1d_local(
            x, w.astype(x.dtype), None, axis=SEQ_AXIS, activation="silu"
        ),
        (normal(1, T, conv_c), w),
    )
    # Mamba-1 selective scan: d_inner 2 d_model, N = 16.
    Dm = 2 * d_model
    A = -jnp.broadcast_to(jnp.arange(1, 17, dtype=jnp.float32), (Dm, 16))
    scan_args = (normal(1, T, Dm), normal(1, T, Dm), A, normal(1, T, 16), normal(1, T, 16))
    # The block's final state differentiated by the XLA loop (the default) and, on a GPU, by
    # the Triton kernel (``reduction="pallas_triton"``).
    reductions = {"selective_scan": "xla"}
    if dispatch.available("pallas_triton") and not dispatch.interpret_mode():
        reductions["selective_scan_triton_reduction"] = "pallas_triton"
    for name, reduction in reductions.items():
        cases[name] = (
            lambda u, d, A, b, c: kernels.selective_scan(u, d, A, b, c, delta_softplus=True),
            lambda u, d, A, b, c, r=reduction: selective_scan_local(
                u, d, A, b, c, None, None, axis=SEQ_AXIS, delta_softplus=True, reduction=r
            )[0],
            scan_args,
        )
    # Gated DeltaNet: H heads of 64, L2-normalised q and k, beta in (0, 1).
    unit = lambda x: (x / jnp.linalg.norm(x.astype(jnp.float32), axis=-1, keepdims=True)).astype(bf)
    beta = jax.nn.sigmoid(normal(1, T, H, dtype=jnp.float32))
    gd = -jax.nn.softplus(normal(1, T, H, dtype=jnp.float32)) * 0.1
    cases["gated_delta_rule"] = (
        lambda q, k, v, b, g: kernels.gated_delta_rule(q, k, v, b, g),
        lambda q, k, v, b, g: gated_delta_rule_local(q, k, v, b, g, axis=SEQ_AXIS, scale=D**-0.5)[
            0
        ],
        (unit(normal(1, T, H, D)), unit(normal(1, T, H, D)), normal(1, T, H, D), beta, gd),
    )
    return cases


def on_one_device_axis(local: Callable, args: tuple) -> Callable:
    """``local`` inside ``shard_map`` over a ``seq`` axis of one device (the first), every
    argument split along time (dim 1) where it has one."""
    mesh = mesh_of(1)
    specs = tuple(P(None, SEQ_AXIS) if getattr(a, "ndim", 0) >= 3 else P() for a in args)
    return shard_over_sequence(local, mesh, specs, P(None, SEQ_AXIS))


def forward_backward(fn: Callable, args: tuple) -> Callable:
    """jit of the gradients of ``sum(fn(*args) * cotangent)`` for every floating argument."""
    idx = tuple(i for i, a in enumerate(args) if jnp.issubdtype(a.dtype, jnp.floating))

    def loss(*a):
        y = fn(*a)
        return jnp.sum(y.astype(jnp.float32) * jnp.cos(y.astype(jnp.float32)))

    return jax.jit(jax.grad(loss, argnums=idx))


# --- profiles -------------------------------------------------------------------------------


def collective_seconds(trace_dir: str) -> dict:
    """From a ``jax.profiler`` trace with ``create_perfetto_trace=True``: seconds of
    collective ops on the first device (events whose names are XLA collectives or NCCL
    kernels; overlapped time counts too) and of all its device events."""
    paths = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
    if not paths:
        return {"collective_s": None, "device_busy_s": None}
    with gzip.open(max(paths, key=os.path.getmtime), "rt") as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    names = {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            names[e["pid"]] = str(e.get("args", {}).get("name", ""))
    device_pids = sorted(pid for pid, n in names.items() if "/device:" in n.lower())
    pid = device_pids[0] if device_pids else None
    total = coll = 0.0
    for e in events:
        if e.get("ph") != "X" or (pid is not None and e.get("pid") != pid):
            continue
        dur = float(e.get("dur", 0.0)) * 1e-6
        total += dur
        label = (str(e.get("name", "")) + " " + json.dumps(e.get("args", {}))).lower()
        if any(c in label for c in COLLECTIVES):
            coll += dur
    return {"collective_s": coll, "device_busy_s": total, "trace_pid": names.get(pid)}
