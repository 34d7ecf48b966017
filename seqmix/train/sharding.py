"""Device mesh and sharding rules: batch over ``("data", "fsdp")``, parameters over ``fsdp``,
tokens over ``seq``.

The mesh has three named axes, ``data``, ``fsdp`` and ``seq`` (``config.mesh.data`` x
``config.mesh.fsdp`` x ``config.mesh.seq`` devices; ``data=-1`` takes every device left over;
``seq`` is the innermost axis, so a sequence's devices are neighbours). A batch is split over
``data`` and ``fsdp``, so every device group sees a different slice of it (FSDP is data
parallel too). With ``seq > 1`` the token dimension of activations is split over ``seq``
(context parallelism): ``sequence_parallel(mesh, fn)`` runs ``fn`` with the mesh active, and
the mixers then take their context-parallel forms (``seqmix.parallel``). Parameters keep a full copy
per ``data`` group and are split over ``fsdp`` along one dimension chosen by their logical axis
names (the ``out_sharding`` metadata the layers put on every ``nnx.Param``) through
``LOGICAL_RULES``: the first rule whose logical name the parameter carries, whose mesh axis is
still free in that parameter and whose size divides that dimension wins. A parameter without
names, or without a divisible named dimension, is replicated. Optimizer moments take the
sharding of their parameter.
"""

from __future__ import annotations

import logging

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from seqmix.parallel.mesh import SEQ_AXIS

AXES = ("data", "fsdp", SEQ_AXIS)
BATCH_AXES = ("data", "fsdp")

# (logical axis name, mesh axis), in priority order: d_model ("embed") first, as in MaxText's
# FSDP rules; the others are the fallback for parameters without an "embed" dimension.
LOGICAL_RULES: tuple[tuple[str, str | None], ...] = (
    ("embed", "fsdp"),
    ("mlp", "fsdp"),
    ("vocab", "fsdp"),
    ("heads", "fsdp"),
    ("kv", None),
    ("state", None),
    ("conv", None),
)


def mesh_dims(mesh_config, num_devices: int) -> tuple[int, int, int]:
    """``(data, fsdp, seq)`` from ``config.mesh``; ValueError naming ``mesh.data``,
    ``mesh.fsdp`` or ``mesh.seq``."""
    data = mesh_config.get("data", -1)
    fsdp = mesh_config.get("fsdp", 1)
    seq = mesh_config.get("seq", 1)
    for key, value in (("mesh.seq", seq), ("mesh.fsdp", fsdp), ("mesh.data", data)):
        if not isinstance(value, int) or isinstance(value, bool) or (value < 1 and value != -1):
            raise ValueError(
                f"{key} must be a positive integer or -1 (all devices left), got {value!r}"
            )
    if seq == -1:
        raise ValueError("mesh.seq must be a positive integer (the devices of one sequence)")
    if fsdp == -1 and data == -1:
        raise ValueError("mesh.data and mesh.fsdp cannot both be -1")
    if num_devices % seq:
        raise ValueError(f"mesh.seq={seq} does not divide the {num_devices} devices")
    per_seq = num_devices // seq  # device groups left for data x fsdp
    if fsdp == -1:
        fsdp, rest = divmod(per_seq, data)
        if rest or fsdp < 1:
            raise ValueError(
                f"mesh.data={data} does not divide the {per_seq} device groups of "
                f"mesh.seq={seq} ({num_devices} devices)"
            )
    if data == -1:
        data, rest = divmod(per_seq, fsdp)
        if rest or data < 1:
            raise ValueError(
                f"mesh.fsdp={fsdp} does not divide the {per_seq} device groups of "
                f"mesh.seq={seq} ({num_devices} devices)"
            )
    if data * fsdp * seq > num_devices:
        raise ValueError(
            f"mesh.data x mesh.fsdp x mesh.seq = {data} x {fsdp} x {seq} = "
            f"{data * fsdp * seq} devices, but only {num_devices} are available"
        )
    return data, fsdp, seq


def mesh_shape(mesh_config, num_devices: int) -> tuple[int, int]:
    """``(data, fsdp)`` from ``config.mesh`` (see ``mesh_dims``)."""
    return mesh_dims(mesh_config, num_devices)[:2]


def make_mesh(mesh_config, devices=None) -> Mesh:
    """A ``Mesh(("data", "fsdp", "seq"))`` over the first ``data * fsdp * seq`` devices."""
    devices = list(devices if devices is not None else jax.devices())
    data, fsdp, seq = mesh_dims(mesh_config, len(devices))
    grid = np.asarray(devices[: data * fsdp * seq], dtype=object).reshape(data, fsdp, seq)
    return Mesh(grid, AXES)


def sequence_parallel(mesh: Mesh, fn):
    """``fn`` called with ``mesh`` active (``jax.set_mesh``) when the mesh splits the sequence
    (``seq > 1``), so that the layers trace their context-parallel forms; ``fn`` itself
    otherwise. Wrap jitted steps: the active mesh is part of the trace, so a step compiles
    once per mesh. The wrapper keeps ``fn.lower`` (ahead-of-time compilation) under the mesh
    too."""
    if mesh.shape.get(SEQ_AXIS, 1) == 1:
        return fn
    return _WithMesh(mesh, fn)


class _WithMesh:
    """A jitted function whose calls and lowerings trace with ``mesh`` active."""

    def __init__(self, mesh: Mesh, fn):
        self.mesh, self.fn = mesh, fn

    def __call__(self, *args, **kwargs):
        with jax.set_mesh(self.mesh):
            return self.fn(*args, **kwargs)

    def lower(self, *args, **kwargs):
        with jax.set_mesh(self.mesh):
            return self.fn.lower(*args, **kwargs)


def data_parallel_size(mesh: Mesh) -> int:
    return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over ``data`` and ``fsdp``."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def logical_names(variable: nnx.Variable) -> tuple | None:
    """The logical axis names of a variable (``out_sharding`` metadata), or None."""
    names = variable.get_metadata().get("out_sharding", None)
    if names is None:
        return None
    return tuple(names)


def spec_for(names, shape, mesh: Mesh, rules=LOGICAL_RULES) -> P:
    """The ``PartitionSpec`` of one array with logical ``names`` under ``rules``."""
    if not names or len(names) != len(shape):
        return P()
    spec: list[str | None] = [None] * len(shape)
    used: set[str] = set()
    for logical, axis in rules:
        if axis is None or axis in used or axis not in mesh.shape:
            continue
        for i, name in enumerate(names):
            if name == logical and spec[i] is None and shape[i] % mesh.shape[axis] == 0:
                spec[i] = axis
                used.add(axis)
                break
    # A mesh axis of size 1 shards nothing: leave it out (identical placement, simpler specs);
    # trailing Nones dropped (canonical form: P() for replicated).
    spec = [a if a is not None and mesh.shape[a] > 1 else None for a in spec]
    while spec and spec[-1] is None:
        spec.pop()
    return P(*spec)


def state_shardings(state, mesh: Mesh, rules=LOGICAL_RULES):
    """A tree like ``state`` (an ``nnx.State`` of Variables) with a ``NamedSharding`` per
    array, from each Variable's logical names."""

    def one(v):
        if isinstance(v, nnx.Variable):
            names = logical_names(v)
            shape = np.shape(v.get_value())
            if names is not None and len(names) != len(shape):
                logging.warning("logical names %s do not match shape %s; replicating", names, shape)
            return v.replace(NamedSharding(mesh, spec_for(names, shape, mesh, rules)))
        return NamedSharding(mesh, P())

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def like_params_shardings(tree, params, param_shardings, mesh: Mesh):
    """Shardings for a tree (e.g. an optimizer state) whose leaves copy parameters: a leaf
    whose key path ends with a parameter's key path and has its shape takes that parameter's
    sharding; every other leaf is replicated."""
    by_path = {}
    p_leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    s_leaves = jax.tree.leaves(param_shardings)
    for (path, leaf), sharding in zip(p_leaves, s_leaves, strict=True):
        by_path[tuple(path)] = (np.shape(leaf), sharding)
    suffix_lengths = sorted({len(p) for p in by_path}, reverse=True)

    def one(path, leaf):
        path = tuple(path)
        for n in suffix_lengths:
            if len(path) >= n:
                hit = by_path.get(path[len(path) - n :])
                if hit is not None and hit[0] == np.shape(leaf):
                    return hit[1]
        return replicated(mesh)

    return jax.tree_util.tree_map_with_path(one, tree)


def abstract_with(tree, shardings):
    """``jax.ShapeDtypeStruct`` leaves carrying ``shardings`` (targets for restore/jit)."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), tree, shardings
    )


def describe(mesh: Mesh) -> str:
    return " x ".join(f"{a}={mesh.shape[a]}" for a in mesh.axis_names)
