"""The sequence axis of a device mesh and the partition specs of sequence-sharded arrays.

A mesh shards the token dimension when it has an axis named ``SEQ_AXIS`` (``"seq"``) of size
> 1. The context-parallel ops find that mesh in their ``mesh=`` argument or, when it is
None, in the active mesh (``jax.set_mesh``); with neither they are the plain ops. Arrays of
shape ``[batch, time, ...]`` are split over the sequence axis along ``time`` and over every
other mesh axis of size > 1 along ``batch`` (when those axes divide the batch; otherwise the
batch is replicated there).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import AbstractMesh, Mesh
from jax.sharding import PartitionSpec as P

SEQ_AXIS = "seq"

AnyMesh = Mesh | AbstractMesh


def sequence_mesh(mesh: AnyMesh | None = None, axis: str = SEQ_AXIS) -> AnyMesh | None:
    """``mesh`` (or the active mesh when None) if its ``axis`` has more than one device,
    else None: the ops then run on one device's view of the whole sequence."""
    if mesh is None:
        mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or axis not in mesh.axis_names:
        return None
    return mesh if mesh.shape[axis] > 1 else None


def sequence_parallel_size(mesh: AnyMesh | None = None, axis: str = SEQ_AXIS) -> int:
    """The number of devices the token dimension is split over (1 when it is not)."""
    found = sequence_mesh(mesh, axis)
    return 1 if found is None else int(found.shape[axis])


def batch_axes(mesh: AnyMesh, axis: str, batch_size: int) -> tuple[str, ...] | None:
    """The mesh axes other than ``axis`` (of size > 1) that split the batch dimension, or
    None when there are none or their product does not divide ``batch_size``."""
    axes = tuple(a for a in mesh.axis_names if a != axis and mesh.shape[a] > 1)
    if not axes or batch_size % math.prod(mesh.shape[a] for a in axes):
        return None
    return axes


def token_spec(batch: tuple[str, ...] | None, axis: str) -> P:
    """``[batch, time, ...]`` split over ``batch`` axes and the sequence ``axis``."""
    return P(batch, axis)


def batch_spec(batch: tuple[str, ...] | None) -> P:
    """``[batch, ...]`` split over the batch axes only (replicated along the sequence)."""
    return P(batch)


def check_length(name: str, length: int, mesh: AnyMesh, axis: str, multiple: int = 1) -> int:
    """The local length ``length // devices``; ValueError naming ``name`` unless the devices
    of ``axis`` (times ``multiple``) divide it."""
    n = int(mesh.shape[axis])
    if length % (n * multiple):
        extra = f" x {multiple}" if multiple > 1 else ""
        raise ValueError(
            f"{name}: the sequence length {length} must be divisible by the {n}{extra} "
            f"devices of mesh axis {axis!r} (context parallelism splits time evenly)"
        )
    return length // n


def shift_perm(n: int, shift: int) -> list[tuple[int, int]]:
    """``ppermute`` pairs sending block ``j`` to ``j + shift`` (devices off the end send
    nothing, and devices nothing reaches receive zeros)."""
    return [(j, j + shift) for j in range(n) if 0 <= j + shift < n]


def axis_position(axis: str) -> tuple[jax.Array, int]:
    """``(index, size)`` of this device along ``axis`` (inside ``shard_map``)."""
    return lax.axis_index(axis), lax.axis_size(axis)


def shard_over_sequence(local, mesh: AnyMesh, in_specs, out_specs):
    """``jax.shard_map(local, ...)`` (``check_vma=False``) whose VJP keeps no zero-size
    residual.

    Residuals leave ``shard_map`` stacked over the mesh, and XLA's Shardy partitioner
    (jaxlib 0.11.2) crashes on a zero-size one, which some implementations' backward passes
    produce (``lax.associative_scan`` leaves empty slices). ``local`` therefore runs under a
    ``custom_vjp`` that saves ``jax.vjp``'s residuals without the empty ones and rebuilds
    those from their shapes: the same residuals and backward, one layer of bookkeeping.
    """
    return jax.shard_map(
        _without_empty_residuals(local),
        mesh=mesh,
        in_specs=in_specs,
        out_specs=out_specs,
        check_vma=False,
    )


def _without_empty_residuals(fn):
    layout = []  # the residual tree and its empty leaves' avals, recorded when fwd is traced

    @jax.custom_vjp
    def wrapped(*args):
        return fn(*args)

    def fwd(*args):
        out, vjp = jax.vjp(fn, *args)
        leaves, tree = jax.tree.flatten(vjp)
        empty = {i: (x.shape, x.dtype) for i, x in enumerate(leaves) if x.size == 0}
        layout[:] = [(tree, empty)]
        return out, [x for i, x in enumerate(leaves) if i not in empty]

    def bwd(kept, ct):
        ((tree, empty),) = layout
        kept = iter(kept)
        leaves = [
            jnp.zeros(*empty[i]) if i in empty else next(kept) for i in range(tree.num_leaves)
        ]
        return tuple(jax.tree.unflatten(tree, leaves)(ct))

    wrapped.defvjp(fwd, bwd)
    return wrapped
