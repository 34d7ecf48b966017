"""Context-parallel short causal convolution: a halo of ``width - 1`` tokens.

Output ``t`` reads inputs ``t - W + 1 .. t``, so the device holding tokens
``[r L, (r + 1) L)`` needs only the ``W - 1`` inputs before its block: one ``ppermute`` of
the previous device's last ``W - 1`` tokens (whole blocks from several devices when
``L < W - 1``), passed to ``seqmix.kernels.causal_conv1d`` as its ``initial_state``. The
first device takes the sequence's own initial state (zeros by default); the final state
(the sequence's last ``W - 1`` inputs) is gathered from the last devices' tails.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from seqmix import kernels
from seqmix.parallel import exchange
from seqmix.parallel.mesh import (
    SEQ_AXIS,
    AnyMesh,
    axis_position,
    batch_axes,
    batch_spec,
    check_length,
    sequence_mesh,
    shard_over_sequence,
    token_spec,
)

Array = jax.Array


def causal_conv1d(
    x: Array,
    weight: Array,
    bias: Array | None = None,
    *,
    activation: str | None = None,
    initial_state: Array | None = None,
    return_final_state: bool = False,
    mesh: AnyMesh | None = None,
    axis: str = SEQ_AXIS,
    **op_kwargs,
) -> Array | tuple[Array, Array]:
    """``seqmix.kernels.causal_conv1d`` with the sequence split over mesh ``axis``.

    Same arguments and results as the op (x ``[B, T, C]``, weight ``[W, C]``; ``op_kwargs``
    such as ``implementation`` go to the op). ``mesh``: a mesh with an ``axis`` of size > 1
    (None: the active mesh); without one this is the op itself.
    """
    found = sequence_mesh(mesh, axis)
    if found is None:
        return kernels.causal_conv1d(
            x,
            weight,
            bias,
            activation=activation,
            initial_state=initial_state,
            return_final_state=return_final_state,
            **op_kwargs,
        )
    if x.ndim != 3:
        raise ValueError(f"x must have shape [batch, time, channels], got {x.shape}")
    check_length("x", x.shape[1], found, axis)
    bx = batch_axes(found, axis, x.shape[0])
    tok, row = token_spec(bx, axis), batch_spec(bx)
    local = functools.partial(
        causal_conv1d_local,
        axis=axis,
        activation=activation,
        return_final_state=bool(return_final_state),
        **op_kwargs,
    )

    def body(x, weight, bias, s0):
        return local(x, weight, bias, initial_state=s0)

    return shard_over_sequence(
        body,
        found,
        (tok, P(), P(), row),
        (tok, row) if return_final_state else tok,
    )(x, weight, bias, initial_state)


def causal_conv1d_local(
    x: Array,
    weight: Array,
    bias: Array | None,
    *,
    axis: str,
    activation: str | None = None,
    initial_state: Array | None = None,
    return_final_state: bool = False,
    **op_kwargs,
) -> Array | tuple[Array, Array]:
    """The per-device program (inside ``shard_map`` over ``axis``): this device's block ->
    y, or ``(y, the sequence's last W - 1 inputs)``."""
    r, _ = axis_position(axis)
    width = weight.shape[0]
    B, L, C = x.shape
    if width == 1:  # no history
        y = kernels.causal_conv1d(x, weight, bias, activation=activation, **op_kwargs)
        return (y, x[:, :0]) if return_final_state else y
    history, _ = exchange.previous_tokens(x, width - 1, axis)
    start = jnp.zeros((B, width - 1, C), x.dtype) if initial_state is None else initial_state
    # The sequence's initial state fills the halo positions before t = 0.
    global_pos = r * L + jnp.arange(-(width - 1), 0)
    history = jnp.where(
        (global_pos >= 0)[None, :, None],
        history,
        jnp.take(start, jnp.clip(global_pos + width - 1, 0, width - 2), axis=1).astype(x.dtype),
    )
    y = kernels.causal_conv1d(
        x, weight, bias, activation=activation, initial_state=history, **op_kwargs
    )
    if not return_final_state:
        return y
    tail = x[:, L - min(L, width - 1) :]
    tails = lax.all_gather(tail, axis, axis=1, tiled=True)  # [B, n * min(L, W - 1), C]
    final = jnp.concatenate([start.astype(x.dtype), tails], axis=1)[:, -(width - 1) :]
    return y, final
