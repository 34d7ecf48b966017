"""Context-parallel selective scan (Mamba-1).

The scan ``h_t = exp(dt_t A) * h_{t-1} + dt_t B_t u_t`` is diagonal in the state, so with
the sequence split over the devices of the sequence axis (device ``r`` holds tokens
``[r L, (r + 1) L)``) the state decomposes exactly as

    h_t = h_t^0 + exp(A * sum_{s <= t} dt_s) * h_in

(``h^0`` the scan from a zero state, the product elementwise over ``[channels, state]``).
Every device:

1. runs ``seqmix.kernels.selective_scan`` on its block from a zero state (output and final
   state);
2. all-gathers the final states and the block decays ``exp(A * sum dt)`` and folds those of
   the devices before it into ``h_in`` (``exchange.carried_states``);
3. adds the fix-up ``silu(z_t) * C_t . (exp(A * cumsum dt)_t * h_in)``, which is the same op
   run on zero inputs from ``h_in``: the fused kernel then computes the cumulative decay
   elementwise without materialising ``[T, channels, state]``, and its VJP gives the
   gradients. D and the gate are linear in the output, so the two parts add.

A state reset by a large ``dt`` (``seqmix.layers.Mamba``'s packed rows) needs nothing more:
``exp(A dt)`` is exactly 0 there, and so is the block decay.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from seqmix import kernels
from seqmix.parallel import exchange
from seqmix.parallel.mesh import (
    SEQ_AXIS,
    AnyMesh,
    batch_axes,
    batch_spec,
    check_length,
    sequence_mesh,
    shard_over_sequence,
    token_spec,
)

Array = jax.Array


def selective_scan(
    u: Array,
    delta: Array,
    A: Array,
    B: Array,
    C: Array,
    D: Array | None = None,
    z: Array | None = None,
    *,
    delta_bias: Array | None = None,
    delta_softplus: bool = False,
    initial_state: Array | None = None,
    return_final_state: bool = False,
    mesh: AnyMesh | None = None,
    axis: str = SEQ_AXIS,
    **op_kwargs,
) -> Array | tuple[Array, Array]:
    """``seqmix.kernels.selective_scan`` with the sequence split over mesh ``axis``.

    Same arguments and results as the op (u, delta, z ``[B, T, Dm]``; B, C ``[B, T, N]`` or
    ``[B, T, G, N]``; A ``[Dm, N]``; ``op_kwargs`` such as ``implementation`` go to the op).
    ``mesh``: a mesh with an ``axis`` of size > 1 (None: the active mesh); without one this
    is the op itself. T must be divisible by the devices of ``axis``.
    """
    found = sequence_mesh(mesh, axis)
    kw = dict(delta_bias=delta_bias, delta_softplus=delta_softplus, **op_kwargs)
    if found is None:
        return kernels.selective_scan(
            u,
            delta,
            A,
            B,
            C,
            D,
            z,
            initial_state=initial_state,
            return_final_state=return_final_state,
            **kw,
        )
    if u.ndim != 3:
        raise ValueError(f"u must have shape [batch, time, channels], got {u.shape}")
    check_length("u", u.shape[1], found, axis)
    bx = batch_axes(found, axis, u.shape[0])
    tok, row = token_spec(bx, axis), batch_spec(bx)
    local = functools.partial(
        selective_scan_local,
        axis=axis,
        delta_softplus=bool(delta_softplus),
        **op_kwargs,
    )

    def body(u, delta, A, B, C, D, z, bias, s0):
        return local(u, delta, A, B, C, D, z, delta_bias=bias, initial_state=s0)

    y, final = shard_over_sequence(
        body,
        found,
        (tok, tok, P(), tok, tok, P(), tok, P(), row),
        (tok, row),
    )(u, delta, A, B, C, D, z, delta_bias, initial_state)
    return (y, final) if return_final_state else y


def selective_scan_local(
    u: Array,
    delta: Array,
    A: Array,
    B: Array,
    C: Array,
    D: Array | None,
    z: Array | None,
    *,
    axis: str,
    delta_bias: Array | None = None,
    delta_softplus: bool = False,
    initial_state: Array | None = None,
    **op_kwargs,
) -> tuple[Array, Array]:
    """The per-device program (inside ``shard_map`` over ``axis``): this device's block ->
    ``(y, final state of the whole sequence)``."""
    kw = dict(delta_bias=delta_bias, delta_softplus=delta_softplus, **op_kwargs)
    y, local_final = kernels.selective_scan(u, delta, A, B, C, D, z, return_final_state=True, **kw)
    dt = delta.astype(jnp.float32)
    if delta_bias is not None:
        dt = dt + delta_bias.astype(jnp.float32)
    if delta_softplus:
        dt = jax.nn.softplus(dt)
    block_decay = jnp.exp(jnp.sum(dt, axis=1)[..., None] * A.astype(jnp.float32))  # [B, Dm, N]
    h_in, final = exchange.carried_states(local_final, block_decay, axis, initial_state)
    fix = kernels.selective_scan(
        jnp.zeros_like(u), delta, A, B, C, None, z, initial_state=h_in, **kw
    )
    return (y.astype(jnp.float32) + fix.astype(jnp.float32)).astype(u.dtype), final
