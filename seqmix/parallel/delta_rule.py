"""Context-parallel gated delta rule (Gated DeltaNet, DeltaNet).

The state update ``S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T`` is
affine in ``S`` but not diagonal: a block of tokens maps an incoming state to
``M S_in + S^0`` with a ``[K, K]`` transition ``M = prod_t exp(g_t) (I - beta_t k_t k_t^T)``
(later tokens on the left) and ``S^0`` the block's state from zero. With the sequence split
over the devices of the mesh's sequence axis (device ``r`` holds tokens
``[r L, (r + 1) L)``), every device:

1. runs ``seqmix.kernels.gated_delta_rule`` once on its block over ``V + K`` value
   columns, ``[v | 0]`` from the state ``[0 | I]``: the state's columns evolve
   independently, so the first ``V`` give the block's own output and state from zero
   (``o^0``, ``S^0``) and the last ``K`` its transition (final state ``M``) and
   ``p_t = scale * M_{<=t}^T q_t`` (outputs), by the op's own kernels and VJP;
2. all-gathers the pairs ``(S^0, M)`` and folds those of the devices before it into
   ``S_in`` (``exchange.carried_states`` with ``M @ S``);
3. adds the correction ``o_t - o_t^0 = scale * (M_{<=t} S_in)^T q_t = S_in^T p_t``.

One call of the op on ``V + K`` columns against one on ``V``: the price of a transition
that is a matrix rather than a decay (the chunk's UT transform, which depends on the keys
only, is computed once); the collective moves ``n`` states and ``n`` transitions per
layer. Packed rows reset the state where the id changes: the op's segment
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
    Hv, V = v.shape[2], v.shape[3]
    r, n = axis_position(axis)
    kw = dict(scale=scale, segment_ids=segment_ids, **op_kwargs)
    # One call over V + K value columns: [v | 0] from the state [0 | I]. The columns evolve
    # independently, so the first V are the block's own (o^0, S^0) and the last K give the
    # transition M (final state) and scale * M_{<=t}^T q_t (outputs).
    eye = jnp.broadcast_to(jnp.eye(K, dtype=jnp.float32), (B, Hv, K, K))
    v_ext = jnp.concatenate([v, jnp.zeros((B, L, Hv, K), v.dtype)], axis=-1)
    s_ext = jnp.concatenate([jnp.zeros((B, Hv, K, V), jnp.float32), eye], axis=-1)
    o_ext, final_ext = kernels.gated_delta_rule(
        q, k, v_ext, beta, log_decay, initial_state=s_ext, return_final_state=True, **kw
    )
    o, qm = o_ext[..., :V], o_ext[..., V:]
    local_final, transition = final_ext[..., :V], final_ext[..., V:]
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
    fix = jnp.einsum(
        "blhk,bhkv->blhv", qm.astype(jnp.float32), s_in, precision=lax.Precision.HIGHEST
    )
    return (o.astype(jnp.float32) + fix).astype(o.dtype), final
