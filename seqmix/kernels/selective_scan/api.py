"""Public selective-scan op (Mamba-1)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from seqmix.kernels import checks
from seqmix.kernels.dispatch import Op
from seqmix.kernels.selective_scan import reference, tuning

Array = jax.Array

# Every implementation is called as impl(u, delta, A, B, C, D, z, *, delta_bias,
# delta_softplus, initial_state[, config]) with B and C as [B, T, G, N] and returns
# (y, final_state). The Pallas backends take config= (their Config in tuning.py, or None).
SELECTIVE_SCAN = Op(
    "selective_scan",
    impls={
        "naive": reference.selective_scan_naive,
        "xla": reference.selective_scan_xla,
        "pallas_triton": "seqmix.kernels.selective_scan.triton:selective_scan",
        "pallas_tpu": "seqmix.kernels.selective_scan.tpu:selective_scan",
    },
    auto={"cpu": ("xla",), "gpu": ("pallas_triton", "xla"), "tpu": ("xla",)},
    configs={"pallas_triton": tuning.TritonConfig, "pallas_tpu": tuning.TpuConfig},
)


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
    implementation: str | None = None,
    config: tuning.TritonConfig | tuning.TpuConfig | None = None,
) -> Array | tuple[Array, Array]:
    """Mamba-1's selective scan.

    ``dt = softplus(delta + delta_bias)`` (when ``delta_softplus``; otherwise
    ``delta + delta_bias``), ``h_t = exp(dt_t A) * h_{t-1} + dt_t B_t u_t``,
    ``y_t = C_t . h_t + D u_t``, then ``y *= silu(z)`` when z is given.

    Args:
      u, delta: ``[B, T, Dm]``.
      A: ``[Dm, N]``, <= 0 (the state decays by ``exp(dt A)``; checked when concrete).
      B, C: ``[B, T, N]`` or ``[B, T, G, N]`` with ``Dm % G == 0``; channel ``d`` reads group
        ``d // (Dm // G)``.
      D: ``[Dm]`` skip; z: ``[B, T, Dm]`` gate; delta_bias: ``[Dm]``.
      initial_state: float32 ``[B, Dm, N]``.
      implementation: see ``seqmix.kernels.dispatch``.
      config: the tuning of a Pallas backend, ``tuning.TritonConfig`` (pallas_triton) or
        ``tuning.TpuConfig`` (pallas_tpu); None: the table's for this GPU generation. With
        ``implementation=None`` a config selects its backend.

    Empty inputs: ``B`` or ``T`` may be 0: an empty ``y`` and the final state equals the
    initial state (zeros when None), computed without an implementation (the same for every
    one). ``Dm`` and ``N`` must be >= 1.

    Returns:
      ``y [B, T, Dm]`` in u's dtype, or ``(y, final_state [B, Dm, N] float32)``.
    """
    checks.check_array("u", u, 3, "[batch, time, channels]")
    checks.check_sizes("u", u, "[batch, time, channels]", (2,))
    Bsz, T, Dm = u.shape
    checks.check_array("delta", delta, 3, "[batch, time, channels]", shape=(Bsz, T, Dm))
    checks.check_array("A", A, 2, "[channels, state]", shape=(Dm, None))
    checks.check_sizes("A", A, "[channels, state]", (1,))
    checks.check_nonpositive("A", A, "exp(dt * A) is the decay of the state")
    N = A.shape[1]
    groups = []
    for name, x in (("B", B), ("C", C)):
        if hasattr(x, "ndim") and x.ndim == 3:
            checks.check_array(name, x, 3, "[batch, time, state]", shape=(Bsz, T, N))
            x = x[:, :, None, :]
        else:
            checks.check_array(name, x, 4, "[batch, time, groups, state]", shape=(Bsz, T, None, N))
            checks.check_heads("u (channels)", Dm, name + " (groups)", x.shape[2])
        groups.append(x)
    B, C = groups
    if B.shape[2] != C.shape[2]:
        raise ValueError(
            f"B and C must have the same number of groups, got {B.shape[2]} and {C.shape[2]}"
        )
    if D is not None:
        checks.check_array("D", D, 1, "[channels]", shape=(Dm,))
    if z is not None:
        checks.check_array("z", z, 3, "[batch, time, channels]", shape=(Bsz, T, Dm))
    if delta_bias is not None:
        checks.check_array("delta_bias", delta_bias, 1, "[channels]", shape=(Dm,))
    if initial_state is not None:
        checks.check_array(
            "initial_state", initial_state, 3, "[batch, channels, state]", shape=(Bsz, Dm, N)
        )
        initial_state = initial_state.astype(jnp.promote_types(initial_state.dtype, jnp.float32))
    if checks.empty(Bsz, T):
        SELECTIVE_SCAN.validate(implementation, config)
        y = jnp.zeros((Bsz, T, Dm), u.dtype)
        final = (
            jnp.zeros((Bsz, Dm, N), checks.accum_dtype(u.dtype))
            if initial_state is None
            else initial_state
        )
        return (y, final) if return_final_state else y
    y, final = SELECTIVE_SCAN(
        implementation,
        u,
        delta,
        A,
        B,
        C,
        D,
        z,
        delta_bias=delta_bias,
        delta_softplus=bool(delta_softplus),
        initial_state=initial_state,
        config=config,
    )
    return (y, final) if return_final_state else y
