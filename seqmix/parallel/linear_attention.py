"""Context-parallel gated linear attention (linear attention, RetNet, GLA, Mamba-2 SSD).

The sequence is split over the devices of the mesh's sequence axis; device ``r`` holds
tokens ``[r L, (r + 1) L)``. With ``b_t`` the cumulative log decay from the block's first
token to ``t`` (inclusive), the recurrence ``S_t = exp(g_t) S_{t-1} + k_t v_t^T`` splits
exactly into a zero-state part and the incoming state ``S_in``:

    S_t = S_t^0 + exp(b_t) * S_in,        o_t = o_t^0 + scale * (q_t * exp(b_t))^T S_in

so every device (LASP-2's scheme):

1. runs ``seqmix.kernels.linear_attention`` on its block from a zero state, returning
   ``o^0`` and its final state;
2. all-gathers the final states and the block decays ``exp(b_last)`` (one collective of
   ``n`` states per layer) and folds those of the devices before it into ``S_in``
   (``exchange.carried_states``);
3. adds the correction ``scale * (q_t * exp(b_t))^T S_in``: one ``[L, K] x [K, V]`` product
   per head, where the op itself does several per chunk.

Packed rows (``segment_ids``) reset the state where the id changes: the correction stops
at the block's first reset, a block with a reset passes no incoming state on, and a reset
on the boundary between two devices is seen by comparing the previous device's last id.
``normalize=True`` runs the op on ``[v, 1]`` (its documented normaliser column), corrects
numerator and normaliser together and divides once, as the op does.

Gradients come from JAX's autodiff through ``shard_map``: the all-gather transposes to a
reduce-scatter of the states' cotangents, and the op's own VJP (with its final state's
cotangent) does the rest.
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

# ``normalize=True`` divides by ``scale * q^T z + 1e-6`` (seqmix.kernels.linear_attention).
NORMALIZE_EPS = 1e-6


def linear_attention(
    q: Array,
    k: Array,
    v: Array,
    log_decay: Array | None = None,
    *,
    scale: float | None = None,
    initial_state: Array | None = None,
    return_final_state: bool = False,
    segment_ids: Array | None = None,
    normalize: bool = False,
    mesh: AnyMesh | None = None,
    axis: str = SEQ_AXIS,
    **op_kwargs,
) -> Array | tuple[Array, Array]:
    """``seqmix.kernels.linear_attention`` with the sequence split over mesh ``axis``.

    Same arguments and results as the op (q, k ``[B, T, Hqk, K]``; v ``[B, T, Hv, V]``;
    log_decay None, ``[B, T, Hv]`` or ``[B, T, Hv, K]``; ``op_kwargs`` such as
    ``chunk_size`` and ``implementation`` go to the op on every device). ``mesh``: a mesh
    with an ``axis`` of size > 1 (None: the active mesh); without one this is the op itself.
    T must be divisible by the devices of ``axis``.
    """
    found = sequence_mesh(mesh, axis)
    if found is None:
        return kernels.linear_attention(
            q,
            k,
            v,
            log_decay,
            scale=scale,
            initial_state=initial_state,
            return_final_state=return_final_state,
            segment_ids=segment_ids,
            normalize=normalize,
            **op_kwargs,
        )
    if q.ndim != 4:
        raise ValueError(f"q must have shape [batch, time, qk_heads, key_dim], got {q.shape}")
    B, T, _, K = q.shape
    check_length("q", T, found, axis)
    bx = batch_axes(found, axis, B)
    tok, row = token_spec(bx, axis), batch_spec(bx)
    local = functools.partial(
        linear_attention_local,
        axis=axis,
        scale=K**-0.5 if scale is None else float(scale),
        normalize=bool(normalize),
        **op_kwargs,
    )

    def body(q, k, v, g, seg, s0):
        return local(q, k, v, g, segment_ids=seg, initial_state=s0)

    o, final = shard_over_sequence(
        body,
        found,
        (tok, tok, tok, tok, tok, row),
        (tok, row),
    )(q, k, v, log_decay, segment_ids, initial_state)
    return (o, final) if return_final_state else o


def linear_attention_local(
    q: Array,
    k: Array,
    v: Array,
    log_decay: Array | None,
    *,
    axis: str,
    scale: float,
    segment_ids: Array | None = None,
    initial_state: Array | None = None,
    normalize: bool = False,
    **op_kwargs,
) -> tuple[Array, Array]:
    """The per-device program (inside ``shard_map`` over ``axis``): this device's block of
    q, k, v, log_decay and segment_ids -> ``(o, final state of the whole sequence)``."""
    B, L, Hqk, K = q.shape
    Hv = v.shape[2]
    rep = Hv // Hqk
    r, n = axis_position(axis)
    v_in = jnp.concatenate([v, jnp.ones(v.shape[:-1] + (1,), v.dtype)], -1) if normalize else v
    o, local_final = kernels.linear_attention(
        q,
        k,
        v_in,
        log_decay,
        scale=scale,
        return_final_state=True,
        segment_ids=segment_ids,
        **op_kwargs,
    )

    # Decay from the block's start: b [B, L, Hv] (scalar per head) or [B, L, Hv, K].
    if log_decay is None:
        b = None
        block_decay = jnp.ones((B, Hv, 1, 1), jnp.float32)
    else:
        b = jnp.cumsum(log_decay.astype(jnp.float32), axis=1)
        last = jnp.exp(b[:, -1])
        block_decay = last[..., None, None] if last.ndim == 2 else last[..., None]

    # Which tokens the incoming state reaches (segments reset it where the id changes).
    reaches = None  # [B, L] bool
    if segment_ids is None:
        passes = jnp.ones((B,), bool)
    else:
        prev_last = lax.ppermute(segment_ids[:, -1], axis, shift_perm(n, 1))
        boundary_reset = (r > 0) & (segment_ids[:, 0] != prev_last)
        change = segment_ids[:, 1:] != segment_ids[:, :-1]
        first_run = jnp.concatenate(
            [jnp.ones((B, 1), bool), jnp.cumsum(change, axis=1) == 0], axis=1
        )
        reaches = first_run & ~boundary_reset[:, None]
        passes = reaches[:, -1]
    carry = jnp.where(passes[:, None, None, None], block_decay, 0.0)
    s_in, final = exchange.carried_states(local_final, carry, axis, initial_state)

    # o_t += scale * (q_t * exp(b_t))^T S_in, heads grouped as [Hqk, rep].
    dtype = q.dtype
    precision = lax.Precision.HIGHEST if dtype == jnp.float32 else None
    s_g = s_in.reshape(B, Hqk, rep, K, -1).astype(dtype)
    if b is not None and b.ndim == 4:  # per-channel decay scales q before the product
        qd = q.astype(jnp.float32)[:, :, :, None, :] * jnp.exp(b).reshape(B, L, Hqk, rep, K)
        corr = jnp.einsum(
            "btgrk,bgrkv->btgrv",
            qd.astype(dtype),
            s_g,
            precision=precision,
            preferred_element_type=jnp.float32,
        )
    else:
        corr = jnp.einsum(
            "btgk,bgrkv->btgrv", q, s_g, precision=precision, preferred_element_type=jnp.float32
        )
        if b is not None:
            corr = corr * jnp.exp(b).reshape(B, L, Hqk, rep, 1)
    corr = scale * corr.reshape(B, L, Hv, -1)
    if reaches is not None:
        corr = jnp.where(reaches[:, :, None, None], corr, 0.0)
    o = o.astype(jnp.float32) + corr
    if normalize:
        o = o[..., :-1] / (o[..., -1:] + NORMALIZE_EPS)
    return o.astype(dtype), final
