"""What the devices of the sequence axis exchange: halos of neighbouring tokens and the
states carried from one block of the sequence to the next. Functions of local arrays,
called inside ``shard_map`` over the sequence ``axis``; device ``r`` holds tokens
``[r L, (r + 1) L)``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from seqmix.parallel.mesh import axis_position, shift_perm

Array = jax.Array


def previous_tokens(x: Array, count: int, axis: str) -> tuple[Array, Array]:
    """The ``count`` tokens before this device's block, ``[B, count, ...]`` (zeros where the
    sequence has none), and a ``[count]`` bool that is True where the token exists.

    ``x`` is ``[B, L, ...]``. With ``count <= L`` only the previous device's last ``count``
    tokens move (one ``ppermute``); a longer halo takes whole blocks from
    ``ceil(count / L)`` devices back.
    """
    return _halo(x, count, axis, before=True)


def next_tokens(x: Array, count: int, axis: str) -> tuple[Array, Array]:
    """The ``count`` tokens after this device's block (zeros past the end) and where they
    exist; see ``previous_tokens``."""
    return _halo(x, count, axis, before=False)


def _halo(x, count, axis, *, before):
    r, n = axis_position(axis)
    L = x.shape[1]
    if count == 0:
        return x[:, :0], jnp.zeros((0,), bool)
    hops = math.ceil(count / L)
    if count <= L:  # only the neighbour's edge moves
        piece = x[:, L - count :] if before else x[:, :count]
    else:  # whole blocks from several devices
        piece = x
    hops_in_order = range(hops, 0, -1) if before else range(1, hops + 1)
    parts = [lax.ppermute(piece, axis, shift_perm(n, h if before else -h)) for h in hops_in_order]
    halo = jnp.concatenate(parts, axis=1)
    halo = halo[:, halo.shape[1] - count :] if before else halo[:, :count]
    # global position of each halo token relative to this block's start
    offset = jnp.arange(-count, 0) if before else jnp.arange(L, L + count)
    pos = r * L + offset
    exists = (pos >= 0) & (pos < n * L)
    return halo, exists


def carried_states(
    local_final: Array,
    carry: Array,
    axis: str,
    initial_state: Array | None = None,
    *,
    apply=None,
) -> tuple[Array, Array]:
    """The state entering this device's block and the state after the whole sequence.

    Every device ran its block from a zero state, ending in ``local_final``, and its block
    maps an incoming state ``S`` to ``carry * S`` plus that (``carry`` broadcasts against the
    state: the block's total decay, 0 where the block resets its state). One ``all_gather``
    of the pairs, then ``S_in(r) = sum_{j < r} (prod_{j < m < r} carry_m) final_j`` (plus
    ``initial_state`` decayed through blocks ``0 .. r - 1``), as LASP-2. Every device folds
    all ``n`` pairs (``n`` state-sized products): cheap next to the block's own work.

    ``apply(carry, state)`` generalises the product for blocks whose map is not diagonal
    (the delta rule's ``M @ S`` with a ``[K, K]`` transition ``M``); default ``carry * S``.
    """
    r, _ = axis_position(axis)
    finals = lax.all_gather(local_final, axis)
    carries = lax.all_gather(carry, axis)
    s0 = jnp.zeros_like(local_final) if initial_state is None else initial_state

    def step(state, xs):
        final, c = xs
        return (c * state if apply is None else apply(c, state)) + final, state

    total, entering = lax.scan(step, s0.astype(local_final.dtype), (finals, carries))
    return lax.dynamic_index_in_dim(entering, r, keepdims=False), total
