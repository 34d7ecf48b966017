"""Context-parallel softmax attention.

The sequence is split over the devices of the mesh's sequence axis; device ``r`` holds
tokens ``[r L, (r + 1) L)`` of q, k and v. Two schemes, chosen by the mask:

**Sliding windows** (every side that matters bounded: causal with a left window, or both
sides of a bidirectional window): a query sees only the ``left`` keys before it and the
``right`` after it, so each device takes a halo of that many keys, values and segment ids
from its neighbours (``ppermute``). Only the block's first ``left`` and last ``right``
queries reach a halo: ``seqmix.kernels.attention`` runs once over the block as it is (the
plain op's call), and once per edge over ``[halo | the block's first left + right
tokens]`` (or the mirror at the end) with the same window, whose rows replace the block
call's there. Inside a call the op's positions are the global ones shifted, so its window
mask is the global one; rows of zero queries pad the edge calls and are dropped; halo
positions outside the sequence get a segment id no query of the block has. A window wider
than the block runs one call over ``[halo | block | halo]``.

**Full attention**: K, V (and segment ids) are all-gathered over the axis, and every device
computes its queries against the key blocks they can see, merging the partial results
with their log-sum-exp (``return_lse=True`` of the op). Causal attention is load-balanced
by the zig-zag order: the sequence is cut into ``2 n`` chunks and device ``r`` computes the
queries of chunks ``r`` and ``2 n - 1 - r`` (moved there and back by two ``ppermute`` s each
way): one causal call of the op over the two chunks side by side (their diagonals and the
later chunk against the earlier one: the call's causal mask is the global one there), then
``2 n - 2`` full chunk pairs, the same work on every device. With one device that call is
the op over the whole sequence.
A bidirectional full attention is one call of the op over all keys.

Why the all-gather and not a ring of ``ppermute`` s: the per-device computation is the same
block-pair list either way; the gathered K/V of one layer is ``T x Hkv x D`` (small for GQA
and MQA, and for MHA at the sequence lengths that fit, a few GB at 1M tokens), one
collective that XLA overlaps with the diagonal blocks, and JAX's autodiff turns it into one
reduce-scatter of dK, dV in the backward. A ring would keep only two K/V blocks per device
but needs a hand-written recomputing backward to realise that saving (autodiff through the
ring saves every received block anyway). ``bench_sequence_parallel --mode=scaling``
measures the time in collectives (docs/sequence_parallel.md).

Packed segments: within the diagonal chunks the op masks them with ``segment_ids``; a key
chunk before the query chunk compares the queries' ids with the keys', which the op takes
as ``kv_segment_ids``. Every block is the op.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from seqmix import kernels
from seqmix.kernels.attention.api import normalize_window
from seqmix.parallel import exchange
from seqmix.parallel.mesh import (
    SEQ_AXIS,
    AnyMesh,
    axis_position,
    batch_axes,
    check_length,
    sequence_mesh,
    shard_over_sequence,
    token_spec,
)

Array = jax.Array


def window_sides(local_window_size, causal: bool) -> tuple[int | None, int | None]:
    """``local_window_size`` as ``(left, right)`` keys visible before and after a query
    (None: unbounded), as ``seqmix.kernels.attention`` reads it; ``right = 0`` when causal."""
    return normalize_window(local_window_size, causal)


def attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    causal: bool = False,
    local_window_size: int | tuple[int, int] | None = None,
    segment_ids: Array | None = None,
    softcap: float | None = None,
    scale: float | None = None,
    return_lse: bool = False,
    mesh: AnyMesh | None = None,
    axis: str = SEQ_AXIS,
    **op_kwargs,
) -> Array | tuple[Array, Array]:
    """``seqmix.kernels.attention`` (self-attention) with the sequence split over ``axis``.

    Same arguments and results as the op: q ``[B, T, H, D]``, k and v ``[B, T, Hkv, D]``;
    ``op_kwargs`` such as ``implementation`` go to the op on every device. ``mesh``: a mesh
    with an ``axis`` of size > 1 (None: the active mesh); without one this is the op
    itself. T must be divisible by the devices of ``axis``. A bidirectional window bounded
    on one side only is not supported (NotImplementedError).
    """
    found = sequence_mesh(mesh, axis)
    if found is None:
        return kernels.attention(
            q,
            k,
            v,
            causal=causal,
            local_window_size=local_window_size,
            segment_ids=segment_ids,
            softcap=softcap,
            scale=scale,
            return_lse=return_lse,
            **op_kwargs,
        )
    if q.ndim != 4 or k.ndim != 4 or k.shape[1] != q.shape[1]:
        raise ValueError(
            "context-parallel attention is self-attention: q [batch, time, heads, head_dim] "
            f"and k, v [batch, time, kv_heads, head_dim], got q {q.shape} and k {k.shape}"
        )
    B, T, _, D = q.shape
    check_length("q", T, found, axis)
    left, right = window_sides(local_window_size, bool(causal))
    common = dict(
        axis=axis,
        softcap=None if softcap is None else float(softcap),
        scale=D**-0.5 if scale is None else float(scale),
        **op_kwargs,
    )
    if left is not None and right is not None:
        local = functools.partial(
            windowed_attention_local, left=left, right=right, causal=bool(causal), **common
        )
    elif causal:
        local = functools.partial(causal_attention_local, **common)
    elif left is None and right is None:
        local = functools.partial(full_attention_local, **common)
    else:
        raise NotImplementedError(
            "context-parallel attention: a bidirectional window bounded on one side only "
            f"(local_window_size={local_window_size!r}) is not supported"
        )
    tok = token_spec(batch_axes(found, axis, B), axis)
    want_lse = bool(return_lse)

    def per_device(q, k, v, seg):
        o, lse = local(q, k, v, segment_ids=seg, return_lse=want_lse)
        return (o, lse) if want_lse else o

    out_specs = (tok, tok) if want_lse else tok
    return shard_over_sequence(per_device, found, (tok, tok, tok, tok), out_specs)(
        q, k, v, segment_ids
    )


# --- merging partial attentions ---------------------------------------------------------------


def merge(o1: Array, lse1: Array, o2: Array, lse2: Array) -> tuple[Array, Array]:
    """Attention over the union of two disjoint key sets from the parts over each:
    ``o = (o1 e^lse1 + o2 e^lse2) / (e^lse1 + e^lse2)`` (float32), ``lse = log(e^lse1 +
    e^lse2)``; ``-inf`` marks a part that saw no key (both: ``o = 0``, ``lse = -inf``)."""
    m = lax.stop_gradient(jnp.maximum(lse1, lse2))
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    w1, w2 = jnp.exp(lse1 - m), jnp.exp(lse2 - m)
    total = w1 + w2
    seen = total > 0
    total_safe = jnp.where(seen, total, 1.0)
    o = (o1.astype(jnp.float32) * w1[..., None] + o2.astype(jnp.float32) * w2[..., None]) / (
        total_safe[..., None]
    )
    return o, jnp.where(seen, m + jnp.log(total_safe), -jnp.inf)


def merge_stacked(o_parts: Array, lse_parts: Array) -> tuple[Array, Array]:
    """``merge`` of ``M`` parts stacked on a leading axis: ``o_parts [M, ..., D]``,
    ``lse_parts [M, ...]`` (``-inf``: a part that does not count)."""
    m = lax.stop_gradient(jnp.max(lse_parts, axis=0))
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    w = jnp.exp(lse_parts - m)
    total = jnp.sum(w, axis=0)
    seen = total > 0
    total_safe = jnp.where(seen, total, 1.0)
    o = jnp.sum(w[..., None] * o_parts.astype(jnp.float32), axis=0) / total_safe[..., None]
    return o, jnp.where(seen, m + jnp.log(total_safe), -jnp.inf)


# --- per-device programs (inside shard_map over ``axis``) ------------------------------------


def _op(
    q,
    k,
    v,
    *,
    causal=False,
    window=None,
    segment_ids=None,
    kv_segment_ids=None,
    softcap,
    scale,
    return_lse=True,
    **op_kwargs,
):
    """The op, always as ``(o, lse)``; ``lse`` is None unless asked for (without it cuDNN
    can serve the call on a GPU)."""
    out = kernels.attention(
        q,
        k,
        v,
        causal=causal,
        local_window_size=window,
        segment_ids=segment_ids,
        kv_segment_ids=kv_segment_ids,
        softcap=softcap,
        scale=scale,
        return_lse=return_lse,
        **op_kwargs,
    )
    return out if return_lse else (out, None)


def _full_block(q, k, v, q_ids, kv_ids, *, softcap, scale, **op_kwargs):
    """Queries against a key block they see entirely (apart from segments)."""
    return _op(
        q,
        k,
        v,
        segment_ids=q_ids,
        kv_segment_ids=kv_ids,
        softcap=softcap,
        scale=scale,
        **op_kwargs,
    )


def _sentinel(segment_ids):
    """Per row, an id that no token of the row has (``min - 1``, or ``max + 1`` at the
    bottom of the integer range)."""
    lo, hi = jnp.min(segment_ids, axis=1), jnp.max(segment_ids, axis=1)
    return jnp.where(lo > jnp.iinfo(segment_ids.dtype).min, lo - 1, hi + 1)


def windowed_attention_local(
    q,
    k,
    v,
    *,
    segment_ids=None,
    axis,
    left,
    right,
    causal,
    softcap,
    scale,
    return_lse=True,
    **op_kwargs,
):
    """Sliding-window attention of this device's block with halos from its neighbours.

    When the window fits in the block (``left + right <= L``), only the first ``left`` and
    last ``right`` queries see a halo: the op runs once over the block as it is (the plain
    op's work, without segment ids unless given), and once over each edge, ``[halo | the
    block's first left + right tokens]`` (and the mirror at the end), whose ``2 left +
    right`` rows are a small fraction of ``L``; the edges' rows replace the block call's
    there. Otherwise one call over ``[halo | block | halo]``. Returns ``(o, lse)``, ``lse``
    None unless ``return_lse`` (no call needs it, so the block's may be cuDNN's)."""
    B, L, H, D = q.shape
    if left + right > L:
        return _windowed_padded(
            q,
            k,
            v,
            segment_ids,
            axis,
            left,
            right,
            causal,
            softcap=softcap,
            scale=scale,
            return_lse=return_lse,
            **op_kwargs,
        )
    kw = dict(
        causal=causal,
        window=(left, right),
        softcap=softcap,
        scale=scale,
        return_lse=return_lse,
        **op_kwargs,
    )
    o, lse = _op(q, k, v, segment_ids=segment_ids, **kw)
    ids = jnp.zeros((B, L), jnp.int32) if segment_ids is None else segment_ids
    sentinel = _sentinel(ids)[:, None]
    span, zeros = left + right, lambda n: jnp.zeros((B, n, H, D), q.dtype)
    for size, before in ((left, True), (right, False)):
        if not size:
            continue
        halo = exchange.previous_tokens if before else exchange.next_tokens
        (k_halo, exists), (v_halo, _), (id_halo, _) = (halo(x, size, axis) for x in (k, v, ids))
        id_halo = jnp.where(exists[None], id_halo, sentinel)
        rows = slice(0, left) if before else slice(L - right, L)  # the queries that see it
        keys = slice(0, span) if before else slice(L - span, L)  # the block keys they see
        order = (lambda h, x: [h, x]) if before else (lambda h, x: [x, h])
        o_edge, lse_edge = _op(
            jnp.concatenate([zeros(left), q[:, rows], zeros(right)], axis=1),
            jnp.concatenate(order(k_halo, k[:, keys]), axis=1),
            jnp.concatenate(order(v_halo, v[:, keys]), axis=1),
            segment_ids=jnp.concatenate(order(id_halo, ids[:, keys]), axis=1),
            **kw,
        )
        o_edge = o_edge[:, left : left + size]
        o = lax.dynamic_update_slice_in_dim(o, o_edge.astype(o.dtype), rows.start, 1)
        if return_lse:
            lse_edge = lse_edge[:, left : left + size]
            lse = lax.dynamic_update_slice_in_dim(lse, lse_edge, rows.start, 1)
    return o, lse


def _windowed_padded(q, k, v, segment_ids, axis, left, right, causal, **kw):
    """A window wider than the block: one call over ``[halo | block | halo]`` (halo rows get
    zero queries and are dropped)."""
    B, L, H, D = q.shape
    ids = jnp.zeros((B, L), jnp.int32) if segment_ids is None else segment_ids
    sentinel = _sentinel(ids)[:, None]
    k_before, exists_before = exchange.previous_tokens(k, left, axis)
    v_before, _ = exchange.previous_tokens(v, left, axis)
    id_before, _ = exchange.previous_tokens(ids, left, axis)
    k_after, exists_after = exchange.next_tokens(k, right, axis)
    v_after, _ = exchange.next_tokens(v, right, axis)
    id_after, _ = exchange.next_tokens(ids, right, axis)
    ids_all = jnp.concatenate(
        [
            jnp.where(exists_before[None], id_before, sentinel),
            ids,
            jnp.where(exists_after[None], id_after, sentinel),
        ],
        axis=1,
    )
    q_all = jnp.concatenate(
        [jnp.zeros((B, left, H, D), q.dtype), q, jnp.zeros((B, right, H, D), q.dtype)], axis=1
    )
    o, lse = _op(
        q_all,
        jnp.concatenate([k_before, k, k_after], axis=1),
        jnp.concatenate([v_before, v, v_after], axis=1),
        causal=causal,
        window=(left, right),
        segment_ids=ids_all,
        **kw,
    )
    return o[:, left : left + L], None if lse is None else lse[:, left : left + L]


def full_attention_local(
    q, k, v, *, segment_ids=None, axis, softcap, scale, return_lse=True, **op_kwargs
):
    """Bidirectional attention of this device's queries over the all-gathered keys, as
    ``(o, lse)`` (``lse`` None unless ``return_lse``)."""
    k_all = lax.all_gather(k, axis, axis=1, tiled=True)
    v_all = lax.all_gather(v, axis, axis=1, tiled=True)
    ids_all = None if segment_ids is None else lax.all_gather(segment_ids, axis, axis=1, tiled=True)
    return _op(
        q,
        k_all,
        v_all,
        segment_ids=segment_ids,
        kv_segment_ids=ids_all,
        softcap=softcap,
        scale=scale,
        return_lse=return_lse,
        **op_kwargs,
    )


def _zigzag_perms(n: int):
    """``ppermute`` pairs moving the halves of contiguous blocks (chunks ``2 j`` and
    ``2 j + 1`` of device ``j``) to their zig-zag owners (chunk ``c`` to device ``c`` if
    ``c < n``, else ``2 n - 1 - c``), and back."""
    owner = lambda c: c if c < n else 2 * n - 1 - c
    to_first = [(j, owner(2 * j)) for j in range(n)]
    to_second = [(j, owner(2 * j + 1)) for j in range(n)]
    even_chunk = lambda d: d if d % 2 == 0 else 2 * n - 1 - d
    odd_chunk = lambda d: 2 * n - 1 - d if d % 2 == 0 else d
    back_even = [(d, even_chunk(d) // 2) for d in range(n)]
    back_odd = [(d, odd_chunk(d) // 2) for d in range(n)]
    return to_first, to_second, back_even, back_odd


def _to_zigzag(x, axis, r, n):
    """Contiguous block -> (chunk r, chunk 2n - 1 - r) of this device."""
    to_first, to_second, _, _ = _zigzag_perms(n)
    half = x.shape[1] // 2
    even = lax.ppermute(x[:, :half], axis, to_first)  # receives the even one of its chunks
    odd = lax.ppermute(x[:, half:], axis, to_second)
    r_even = r % 2 == 0
    return jnp.where(r_even, even, odd), jnp.where(r_even, odd, even)


def _from_zigzag(xa, xb, axis, r, n):
    """(chunk r, chunk 2n - 1 - r) -> this device's contiguous block."""
    _, _, back_even, back_odd = _zigzag_perms(n)
    r_even = r % 2 == 0
    first = lax.ppermute(jnp.where(r_even, xa, xb), axis, back_even)
    second = lax.ppermute(jnp.where(r_even, xb, xa), axis, back_odd)
    return jnp.concatenate([first, second], axis=1)


def causal_attention_local(
    q, k, v, *, segment_ids=None, axis, softcap, scale, return_lse=True, **op_kwargs
):
    """Causal attention of this device's block over all keys before it (all-gathered), as
    ``(o, lse)``. With more than one device the partial results merge by their
    log-sum-exp, so every call returns it; with one, the single call returns it only if
    ``return_lse`` (else ``lse`` is None, and cuDNN may serve the call)."""
    r, n = axis_position(axis)
    L = q.shape[1]
    kw = dict(softcap=softcap, scale=scale, **op_kwargs)
    if n == 1:  # the op itself
        return _op(q, k, v, causal=True, segment_ids=segment_ids, return_lse=return_lse, **kw)
    k_all = lax.all_gather(k, axis, axis=1, tiled=True)
    v_all = lax.all_gather(v, axis, axis=1, tiled=True)
    ids_all = None if segment_ids is None else lax.all_gather(segment_ids, axis, axis=1, tiled=True)
    if L % 2:
        return _causal_contiguous(q, k, v, segment_ids, k_all, v_all, ids_all, r, n, **kw)

    C = L // 2

    def chunk(x, c):
        return None if x is None else lax.dynamic_slice_in_dim(x, c * C, C, axis=1)

    a, b = r, 2 * n - 1 - r
    qa, qb = _to_zigzag(q, axis, r, n)
    ids_a, ids_b = chunk(ids_all, a), chunk(ids_all, b)
    # The device's own chunk pairs in one causal call: over [chunk a | chunk b] the call's
    # causal mask is the global one (a < b, each chunk in order), so it is a's and b's
    # diagonals and b against a whole, and one segment-id array serves queries and keys.
    ids_ab = None if ids_all is None else jnp.concatenate([ids_a, ids_b], axis=1)
    o_ab, l_ab = _op(
        jnp.concatenate([qa, qb], axis=1),
        jnp.concatenate([chunk(k_all, a), chunk(k_all, b)], axis=1),
        jnp.concatenate([chunk(v_all, a), chunk(v_all, b)], axis=1),
        causal=True,
        segment_ids=ids_ab,
        **kw,
    )
    oa, ob, la, lb = o_ab[:, :C], o_ab[:, C:], l_ab[:, :C], l_ab[:, C:]

    # 2n - 2 full chunk pairs: chunk a against chunks 0 .. a - 1, chunk b against the chunks
    # 0 .. b - 1 other than a. The partial results are merged once at the end (not carried
    # through the loop), so the backward keeps each pair's bf16 output rather than a
    # float32 accumulator per step.
    def body(_, m):
        use_a = m < a
        c = jnp.where(use_a, m, jnp.where(m - a < a, m - a, m - a + 1))
        q_m = jnp.where(use_a, qa, qb)
        ids_m = None if ids_all is None else jnp.where(use_a, ids_a, ids_b)
        o_m, l_m = _full_block(
            q_m, chunk(k_all, c), chunk(v_all, c), ids_m, chunk(ids_all, c), **kw
        )
        return None, (o_m, l_m)

    steps = jnp.arange(2 * n - 2)
    _, (o_parts, l_parts) = lax.scan(body, None, steps)
    for_a = (steps < a)[:, None, None, None]
    oa, la = merge(oa, la, *merge_stacked(o_parts, jnp.where(for_a, l_parts, -jnp.inf)))
    ob, lb = merge(ob, lb, *merge_stacked(o_parts, jnp.where(for_a, -jnp.inf, l_parts)))
    o = _from_zigzag(oa.astype(q.dtype), ob.astype(q.dtype), axis, r, n)
    return o, _from_zigzag(la, lb, axis, r, n)


def _causal_contiguous(q, k, v, ids, k_all, v_all, ids_all, r, n, **kw):
    """Odd block length (no zig-zag halves): the diagonal block, then blocks 0 .. r - 1
    (a device skips the blocks after its own, so later devices do more)."""
    L = q.shape[1]
    o, lse = _op(q, k, v, causal=True, segment_ids=ids, **kw)
    o = o.astype(jnp.float32)

    def block(x, c):
        return None if x is None else lax.dynamic_slice_in_dim(x, c * L, L, axis=1)

    def body(carry, m):
        def add(carry):
            o_m, l_m = _full_block(
                q, block(k_all, m), block(v_all, m), ids, block(ids_all, m), **kw
            )
            return merge(*carry, o_m, l_m)

        return lax.cond(m < r, add, lambda c: c, carry), None

    (o, lse), _ = lax.scan(body, (o, lse), jnp.arange(n - 1))
    return o.astype(q.dtype), lse
