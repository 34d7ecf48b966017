"""Context-parallel gated delta rule (Gated DeltaNet, DeltaNet).

The state update ``S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T`` is
affine in ``S`` but not diagonal: a block of tokens maps an incoming state to
``M S_in + S^0`` with a ``[K, K]`` transition ``M = prod_t exp(g_t) (I - beta_t k_t k_t^T)``
(later tokens on the left) and ``S^0`` the block's state from zero. With the sequence split
over the devices of the mesh's sequence axis (device ``r`` holds tokens
``[r L, (r + 1) L)``), every device:

1. runs ``seqmix.kernels.gated_delta_rule`` on its block from a zero state (``o^0`` and
   ``S^0``);
2. runs it again on zero values from the identity (``v`` of width K, initial state ``I``):
   its final state is ``M``, by the op's own kernels and VJP;
3. all-gathers the pairs ``(S^0, M)`` and folds those of the devices before it into
   ``S_in`` (``exchange.carried_states`` with ``M @ S``);
4. adds the correction ``o_t - o_t^0 = scale * (M_{<=t} S_in)^T q_t``, which is the op run
   on zero values from ``S_in``.

Three calls of the op per block against one on a single device: the price of a transition
that is a matrix rather than a decay; the collective moves ``n`` states and ``n``
transitions per layer. Packed rows reset the state where the id changes: the op's segment
handling gives ``M = 0`` for a block with a reset inside and stops the correction at the
first reset; a reset on the boundary between two devices is seen by comparing the previous
device's last id, and then no state enters the block.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

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
    shift_perm,
    token_spec,
)

Array = jax.Array


def gated_delta_rule(
    q: Array,
    k: Array,
    v: Array,
    beta: Array,
    log_decay: Array | None = None,
    *,
    scale: float | None = None,
    initial_state: Array | None = None,
    return_final_state: bool = False,
    segment_ids: Array | None = None,
    mesh: AnyMesh | None = None,
    axis: str = SEQ_AXIS,
    **op_kwargs,
) -> Array | tuple[Array, Array]:
    """``seqmix.kernels.gated_delta_rule`` with the sequence split over mesh ``axis``.

    Same arguments and results as the op (q, k ``[B, T, Hqk, K]``; v ``[B, T, Hv, V]``;
    beta and log_decay ``[B, T, Hv]``; ``op_kwargs`` such as ``chunk_size`` and
    ``implementation`` go to the op on every device). ``mesh``: a mesh with an ``axis`` of
    size > 1 (None: the active mesh); without one this is the op itself. T must be
    divisible by the devices of ``axis``.
    """
    found = sequence_mesh(mesh, axis)
    if found is None:
        return kernels.gated_delta_rule(
            q,
            k,
            v,
            beta,
            log_decay,
            scale=scale,
            initial_state=initial_state,
            return_final_state=return_final_state,
            segment_ids=segment_ids,
            **op_kwargs,
        )
    if q.ndim != 4:
        raise ValueError(f"q must have shape [batch, time, qk_heads, key_dim], got {q.shape}")
    B, T, _, K = q.shape
    check_length("q", T, found, axis)
    bx = batch_axes(found, axis, B)
    tok, row = token_spec(bx, axis), batch_spec(bx)
    local = functools.partial(
        gated_delta_rule_local,
        axis=axis,
        scale=K**-0.5 if scale is None else float(scale),
        **op_kwargs,
    )

    def body(q, k, v, beta, g, seg, s0):
        return local(q, k, v, beta, g, segment_ids=seg, initial_state=s0)

    o, final = shard_over_sequence(
        body,
        found,
        (tok, tok, tok, tok, tok, tok, row),
        (tok, row),
    )(q, k, v, beta, log_decay, segment_ids, initial_state)
    return (o, final) if return_final_state else o


def _transition_times_state(m: Array, s: Array) -> Array:
    """``M @ S`` per batch row and head: ``[B, H, K, K] x [B, H, K, V]``."""
    return jnp.einsum("bhij,bhjv->bhiv", m, s, precision=lax.Precision.HIGHEST)


def gated_delta_rule_local(
    q: Array,
    k: Array,
    v: Array,
    beta: Array,
    log_decay: Array | None,
    *,
    axis: str,
    scale: float,
    segment_ids: Array | None = None,
    initial_state: Array | None = None,
    **op_kwargs,
) -> tuple[Array, Array]:
    """The per-device program (inside ``shard_map`` over ``axis``): this device's block ->
    ``(o, final state of the whole sequence)``."""
    B, L, _, K = q.shape
    Hv = v.shape[2]
    r, n = axis_position(axis)
    kw = dict(scale=scale, segment_ids=segment_ids, **op_kwargs)
    op = kernels.gated_delta_rule
    o, local_final = op(q, k, v, beta, log_decay, return_final_state=True, **kw)
    eye = jnp.broadcast_to(jnp.eye(K, dtype=jnp.float32), (B, Hv, K, K))
    zeros_k = jnp.zeros((B, L, Hv, K), v.dtype)
    _, transition = op(
        q, k, zeros_k, beta, log_decay, initial_state=eye, return_final_state=True, **kw
    )
    if segment_ids is not None:  # a reset on the boundary: no state enters this block
        prev_last = lax.ppermute(segment_ids[:, -1], axis, shift_perm(n, 1))
        enters = ~((r > 0) & (segment_ids[:, 0] != prev_last))
    else:
        enters = jnp.ones((B,), bool)
    transition = jnp.where(enters[:, None, None, None], transition, 0.0)
    s_in, final = exchange.carried_states(
        local_final, transition, axis, initial_state, apply=_transition_times_state
    )
    s_in = jnp.where(enters[:, None, None, None], s_in, 0.0)
    fix = op(q, k, jnp.zeros_like(v), beta, log_decay, initial_state=s_in, **kw)
    return (o.astype(jnp.float32) + fix.astype(jnp.float32)).astype(o.dtype), final
