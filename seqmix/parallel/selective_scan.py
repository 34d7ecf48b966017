"""Context-parallel selective scan (Mamba-1).

The scan ``h_t = exp(dt_t A) * h_{t-1} + dt_t B_t u_t`` is diagonal in the state, so with
the sequence split over the devices of the sequence axis (device ``r`` holds tokens
``[r L, (r + 1) L)``) the state decomposes exactly as

    h_t = h_t^0 + exp(A * sum_{s <= t} dt_s) * h_in

(``h^0`` the scan from a zero state, the product elementwise over ``[channels, state]``).
Every device:

1. computes its block's final state from a zero state, ``sum_t exp(A R_t) dt_t B_t u_t``
   with ``R_t = sum_{s > t} dt_s`` (``block_final_state``): no recurrence, a reduction over
   time that XLA fuses into one pass over dt, u and B (the gradients walk the tokens in
   chunks, recomputing the exponentials: no ``[T, channels, state]`` array is kept; or,
   with ``reduction="pallas_triton"``, one Triton kernel computes them);
2. all-gathers the final states and the block decays ``exp(A * sum dt)`` and folds those of
   the devices before it into ``h_in`` (``exchange.carried_states``);
3. runs ``seqmix.kernels.selective_scan`` on its block once, from ``h_in``: the op's own
   output, and through its VJP the gradients, including ``h_in``'s.

A state reset by a large ``dt`` (``seqmix.layers.Mamba``'s packed rows) needs nothing more:
``exp(A dt)`` is exactly 0 there, and so is the block decay.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from seqmix import kernels
from seqmix.kernels import dispatch
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
    reduction: str | None = None,
    **op_kwargs,
) -> Array | tuple[Array, Array]:
    """``seqmix.kernels.selective_scan`` with the sequence split over mesh ``axis``.

    Same arguments and results as the op (u, delta, z ``[B, T, Dm]``; B, C ``[B, T, N]`` or
    ``[B, T, G, N]``; A ``[Dm, N]``; ``op_kwargs`` such as ``implementation`` go to the op).
    ``mesh``: a mesh with an ``axis`` of size > 1 (None: the active mesh); without one this
    is the op itself. T must be divisible by the devices of ``axis``. ``reduction``: the
    backward of each block's final state (``block_final_state``; None: the Triton kernel
    when ``implementation="pallas_triton"``, else XLA).
    """
    found = sequence_mesh(mesh, axis)
    kw = dict(delta_bias=delta_bias, delta_softplus=delta_softplus, **op_kwargs)
    _reduction(reduction, op_kwargs.get("implementation"))
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
        reduction=reduction,
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
    reduction: str | None = None,
    **op_kwargs,
) -> tuple[Array, Array]:
    """The per-device program (inside ``shard_map`` over ``axis``): this device's block ->
    ``(y, final state of the whole sequence)``. ``reduction``: see ``block_final_state``."""
    reduction = _reduction(reduction, op_kwargs.get("implementation"))
    kw = dict(delta_bias=delta_bias, delta_softplus=delta_softplus, **op_kwargs)
    dt = delta.astype(jnp.float32)
    if delta_bias is not None:
        dt = dt + delta_bias.astype(jnp.float32)
    if delta_softplus:
        dt = jax.nn.softplus(dt)
    local_final = block_final_state(dt, u, B, A, reduction)
    block_decay = jnp.exp(jnp.sum(dt, axis=1)[..., None] * A.astype(jnp.float32))  # [B, Dm, N]
    h_in, final = exchange.carried_states(local_final, block_decay, axis, initial_state)
    y = kernels.selective_scan(u, delta, A, B, C, D, z, initial_state=h_in, **kw)
    return y, final


def _later_and_drive(dt, u, B):
    """``(R, dt u)`` float32 ``[B, T, Dm]`` (``R_t`` the dt of the tokens after t) and B as
    ``[B, T, G, N]``."""
    later = lax.cumsum(dt, axis=1, reverse=True) - dt  # sum over s > t, exact near the end
    return later, dt * u.astype(jnp.float32), B[:, :, None] if B.ndim == 3 else B


def _final_parts(dt, u, B, A):
    """Broadcastable pieces of ``sum_t exp(A R_t) w_t``: ``R [B, T, G, c, 1]`` (dt summed over
    the later tokens), ``w = dt u B [B, T, G, c, N]``-broadcastable factors, ``A [G, c, N]``."""
    Bsz, T, Dm = dt.shape
    later, du, Bg = _later_and_drive(dt, u, B)
    Bg = Bg.astype(jnp.float32)  # [B, T, G, N]
    G, N = Bg.shape[2], Bg.shape[3]
    shape = (Bsz, T, G, Dm // G, 1)
    A = A.astype(jnp.float32).reshape(G, -1, N)
    return later.reshape(shape), du.reshape(shape), Bg[:, :, :, None, :], A


REDUCTIONS = ("xla", "pallas_triton")


def _reduction(name: str | None, implementation: str | None = None) -> str:
    """The backward of ``block_final_state``: ``"xla"`` (a loop over chunks of tokens) or
    ``"pallas_triton"`` (one kernel, ``kernels.selective_scan.triton.final_state``; natively on
    a GPU, or in interpret mode). None follows the scan's ``implementation``: the kernel
    where the scan's is named ``"pallas_triton"``, else ``"xla"`` (auto dispatch does not pick
    the kernel until it has run natively on a GPU)."""
    if name is None:
        name = "pallas_triton" if implementation == "pallas_triton" else "xla"
    if name not in REDUCTIONS:
        raise ValueError(f"reduction must be None or one of {REDUCTIONS}, got {name!r}")
    if not dispatch.available(name):
        raise NotImplementedError(
            f"reduction={name!r} needs a GPU (this is {dispatch.platform()}); set "
            "SEQMIX_INTERPRET=1 to run Pallas kernels in interpret mode"
        )
    return name


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def block_final_state(dt: Array, u: Array, B: Array, A: Array, reduction: str = "xla") -> Array:
    """The state after a block scanned from zero, float32 ``[B, Dm, N]``:
    ``sum_t exp(A R_t) dt_t u_t B_t`` with ``R_t = sum_{s > t} dt_s``; ``dt [B, T, Dm]``
    float32, u ``[B, T, Dm]``, B ``[B, T, N]`` or ``[B, T, G, N]``, A ``[Dm, N]``. The value is
    one fused XLA reduction; ``reduction`` (see ``REDUCTIONS``) computes the gradients: the
    XLA form walks the tokens in chunks (``backward_chunk``), recomputing the exponentials of
    each chunk; the Triton kernel holds them in registers."""
    R, du, Bg, Ag = _final_parts(dt, u, B, A)
    final = jnp.sum(jnp.exp(Ag * R) * du * Bg, axis=1)  # [B, G, c, N]
    return final.reshape(dt.shape[0], dt.shape[2], -1)


def _final_fwd(dt, u, B, A, reduction):
    return block_final_state(dt, u, B, A, reduction), (dt, u, B, A)


# float32 bytes of one [B, chunk, Dm, N] temporary of the backward's loop: each step covers as
# many tokens as fit (at least _MIN_CHUNK), so a long block takes tens of steps, not hundreds
# of launch-bound small ones
_CHUNK_BYTES = 128 << 20
_MIN_CHUNK = 16


def backward_chunk(batch: int, T: int, Dm: int, N: int, budget: int | None = None) -> int:
    """Tokens per step of ``block_final_state``'s XLA backward loop: the largest power of two
    whose ``[batch, chunk, Dm, N]`` float32 temporary fits ``budget`` bytes (default
    ``_CHUNK_BYTES``), at least ``_MIN_CHUNK``, at most ``T``."""
    budget = _CHUNK_BYTES if budget is None else budget
    fit = max(1, budget // (4 * batch * Dm * N))
    C = max(_MIN_CHUNK, 1 << (fit.bit_length() - 1))
    return min(C, T)


def _xla_grads(dt, u, B, A, g):
    """``(d du, d R [B, T, Dm], d B [B, T, G, N], d A [Dm, N])`` by a loop over chunks."""
    Bsz, T, Dm = dt.shape
    R, du, Bg, Ag = _final_parts(dt, u, B, A)  # R, du [B, T, G, c, 1]; Bg [B, T, G, 1, N]
    C = backward_chunk(Bsz, T, Dm, A.shape[-1])
    n = -(-T // C)
    pad = lambda x: jnp.pad(x, [(0, 0), (0, n * C - T)] + [(0, 0)] * (x.ndim - 2))
    chunks = lambda x: jnp.moveaxis(pad(x).reshape(Bsz, n, C, *x.shape[2:]), 1, 0)
    g = g.astype(jnp.float32).reshape(Bsz, 1, *Ag.shape)  # [B, 1, G, c, N]

    def step(d_A, xs):
        r, w, b = xs  # one chunk of R, du and Bg
        e = jnp.exp(Ag * r)  # [B, C, G, c, N]
        d_w = jnp.sum(e * b * g, axis=-1, keepdims=True)
        d_b = jnp.sum(e * w * g, axis=3)  # [B, C, G, N]
        d_r = jnp.sum(Ag * e * w * b * g, axis=-1, keepdims=True)
        return d_A + jnp.sum(r * e * w * b * g, axis=(0, 1)), (d_w, d_b, d_r)

    d_A, (d_du, d_B, d_R) = lax.scan(
        step, jnp.zeros(Ag.shape, jnp.float32), (chunks(R), chunks(du), chunks(Bg))
    )
    unchunk = lambda x: jnp.moveaxis(x, 0, 1).reshape(Bsz, n * C, -1)[:, :T]
    d_B = unchunk(d_B).reshape(Bsz, T, Bg.shape[2], -1)
    return unchunk(d_du), unchunk(d_R), d_B, d_A.reshape(A.shape)


def _triton_grads(dt, u, B, A, g):
    """The same gradients by the Triton kernel (``final_state_grads``)."""
    from seqmix.kernels.selective_scan.triton.final_state import final_state_grads

    later, w, Bg = _later_and_drive(dt, u, B)
    return final_state_grads(later, w, Bg, A, g, interpret=dispatch.interpret_mode())


def _final_bwd(reduction, res, ct):
    dt, u, B, A = res
    grads = _triton_grads if reduction == "pallas_triton" else _xla_grads
    d_du, d_R, d_B, d_A = grads(dt, u, B, A, ct)
    # R_t = sum_{s > t} dt_s: dt_s collects d_R of every t < s
    d_dt = d_du * u.astype(jnp.float32) + lax.cumsum(d_R, axis=1) - d_R
    d_u = (d_du * dt).astype(u.dtype)
    d_B = (d_B if B.ndim == 4 else d_B[:, :, 0]).astype(B.dtype)
    return d_dt, d_u, d_B, d_A.astype(A.dtype)


block_final_state.defvjp(_final_fwd, _final_bwd)
