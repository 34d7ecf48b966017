"""Device mesh and sharding rules: batch over ``("data", "fsdp")``, parameters over ``fsdp``.

The mesh has two named axes, ``data`` and ``fsdp`` (``config.mesh.data`` x ``config.mesh.fsdp``
devices; ``data=-1`` takes every device left over). A batch is split over both axes, so every
device sees a different slice of it (FSDP is data parallel too). Parameters keep a full copy
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

AXES = ("data", "fsdp")
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


def mesh_shape(mesh_config, num_devices: int) -> tuple[int, int]:
    """``(data, fsdp)`` from ``config.mesh``; ValueError naming ``mesh.data``/``mesh.fsdp``."""
    data = mesh_config.get("data", -1)
    fsdp = mesh_config.get("fsdp", 1)
    for key, value in (("mesh.fsdp", fsdp), ("mesh.data", data)):
        if not isinstance(value, int) or isinstance(value, bool) or (value < 1 and value != -1):
            raise ValueError(
                f"{key} must be a positive integer or -1 (all devices left), got {value!r}"
            )
    if fsdp == -1 and data == -1:
        raise ValueError("mesh.data and mesh.fsdp cannot both be -1")
    if fsdp == -1:
        fsdp, rest = divmod(num_devices, data)
        if rest or fsdp < 1:
            raise ValueError(f"mesh.data={data} does not divide the {num_devices} devices")
    if data == -1:
        data, rest = divmod(num_devices, fsdp)
        if rest or data < 1:
            raise ValueError(f"mesh.fsdp={fsdp} does not divide the {num_devices} devices")
    if data * fsdp > num_devices:
        raise ValueError(
            f"mesh.data x mesh.fsdp = {data} x {fsdp} = {data * fsdp} devices, but only "
            f"{num_devices} are available"
        )
    return data, fsdp


def make_mesh(mesh_config, devices=None) -> Mesh:
    """A ``Mesh(("data", "fsdp"))`` over the first ``data * fsdp`` devices."""
    devices = list(devices if devices is not None else jax.devices())
    data, fsdp = mesh_shape(mesh_config, len(devices))
    grid = np.asarray(devices[: data * fsdp], dtype=object).reshape(data, fsdp)
    return Mesh(grid, AXES)


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
