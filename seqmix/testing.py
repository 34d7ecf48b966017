"""Checking kernels against their oracles (used by tests, notebooks, benchmarks).

The protocol: fresh random inputs each check, ``||out - ref|| / ||ref||`` under
``tolerance(dtype)``, outputs and every gradient compared, NaN never passes.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

TOLERANCE = {"float32": 1e-5, "float64": 1e-9, "bfloat16": 5e-3, "float16": 5e-3}

# The one measured exception, for linear attention with ``normalize=True`` in bf16 / fp16: the
# output q^T S / q^T z does not change when q is scaled, so dq is the difference of two
# nearly equal terms (through the numerator and through the normaliser column), and so is
# the initial state's gradient; the kernels' bf16 operands (the augmented output, dO and
# the intra-chunk products) leave 0.5-1.5e-2 there against the float32 oracle. Measured
# 2026-11-29: Triton (per-channel decay, segments) dq 7.4e-3 mean / 8.9e-3 max and
# d initial_state 5.6e-3 max over 30 seeds; TPU dq up to 1.5e-2 over 26 seeds; every
# other output and gradient of those cases under 3.5e-3. Keeping the kernels' output in
# float32 took Triton's dq only from 7.1e-3 to 5.3e-3 (mean of 6 seeds), so it was not done.
# In fp16 the same cancellation takes the TPU kernel's dq to 1.8e-3 mean / 3.3e-3 max over
# 66 seeds (within 5e-3 but with a tail), so fp16 gets 1e-2 for those two gradients.
# A wrong gradient is off by O(1); this still tells right from wrong.
NORMALIZE_GRAD_TOL = {
    "bfloat16": {"q": 4e-2, "initial_state": 4e-2},
    "float16": {"q": 1e-2, "initial_state": 1e-2},
}


NATIVE_ENV = "SEQMIX_TEST_DEVICE"


def native_run() -> bool:
    """True when the kernel tests run on the device's own kernels (``pytest -m gpu`` sets
    ``SEQMIX_TEST_DEVICE=gpu``; see tests/conftest.py), False for the CPU run in interpret
    mode."""
    return os.environ.get(NATIVE_ENV, "").strip().lower() == "gpu"


def tolerance(dtype) -> float:
    return TOLERANCE[jnp.dtype(dtype).name]


def fresh_seed() -> int:
    """A new seed per call (reported in failures so that a failing case can be replayed).
    ``SEQMIX_TEST_SEED`` fixes it."""
    fixed = os.environ.get("SEQMIX_TEST_SEED")
    return int(fixed) if fixed else int(np.random.SeedSequence().entropy % (2**31))


def relative_error(x, ref) -> float:
    x = np.asarray(jnp.asarray(x, jnp.float32), np.float64)
    ref = np.asarray(jnp.asarray(ref, jnp.float32), np.float64)
    denom = np.linalg.norm(ref)
    num = np.linalg.norm(x - ref)
    return float(num / denom) if denom > 0 else float(num)


def assert_close(x, ref, tol: float, what: str = "output") -> None:
    """Relative error under ``tol``, same shape, every element finite where ref is."""
    x, ref = np.asarray(jnp.asarray(x, jnp.float32)), np.asarray(jnp.asarray(ref, jnp.float32))
    assert x.shape == ref.shape, f"{what}: shape {x.shape} != reference {ref.shape}"
    finite = np.isfinite(ref)
    assert np.all(np.isfinite(x[finite])), (
        f"{what}: non-finite values where the reference is finite"
    )
    assert np.array_equal(np.isposinf(x), np.isposinf(ref)) and np.array_equal(
        np.isneginf(x), np.isneginf(ref)
    ), f"{what}: infinities differ from the reference"
    err = relative_error(np.where(finite, x, 0), np.where(finite, ref, 0))
    _record_margin(err, tol, what)
    assert err < tol, f"{what}: relative error {err:.3e} >= {tol:.1e}"


def _record_margin(err: float, tol: float, what: str) -> None:
    """With ``SEQMIX_TEST_MARGINS=<file>``, appends ``err / tol``, the check and the test to
    that file: a run of the suite then lists the checks nearest their tolerance (the ones a
    fresh seed could fail), e.g. ``sort -rn <file> | head``."""
    path = os.environ.get("SEQMIX_TEST_MARGINS")
    if path:
        test = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0]
        with open(path, "a") as f:
            f.write(f"{err / tol:.3f}\t{what}\t{test}\n")


def random_cotangent(tree, key):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, len(leaves))
    out = [
        jax.random.normal(k, x.shape, jnp.float32).astype(x.dtype)
        if jnp.issubdtype(x.dtype, jnp.floating)
        else None
        for k, x in zip(keys, leaves)
    ]
    return treedef.unflatten(out)


def upcast(tree):
    """``tree`` with its bf16/fp16 arrays in float32 (the same values). The oracle's side of
    a comparison runs on these, so that its outputs and gradients are float32 results with
    no final rounding of their own: a bf16 kernel is then measured against the float32
    answer (its error is its own rounding), not against a second rounded result (which
    doubled the rounding noise that the 5e-3 tolerance has to hold)."""

    def up(x):
        if hasattr(x, "dtype") and jnp.dtype(x.dtype).name in ("bfloat16", "float16"):
            return jnp.asarray(x).astype(jnp.float32)
        return x

    return jax.tree.map(up, tree)


def vjp_pairs(
    fn: Callable,
    ref: Callable,
    args: Sequence,
    *,
    argnums: Sequence[int],
    seed: int = 0,
    compiler_options: dict | None = None,
):
    """``fn`` on ``args`` and ``ref`` on ``upcast(args)``, each pulled back through one
    random cotangent (drawn in fn's output dtypes, upcast for ref): returns
    ``(outputs, grads)``, each a list of ``(value, reference_value)`` pairs, the grads in
    ``argnums`` order. With ``compiler_options`` each side's output and VJP run in one
    top-level ``jax.jit`` compiled with them (compiler options apply only there). The
    oracle's matmuls run at full float32 precision (a GPU's default is TF32); ``fn`` keeps the
    precision it asks for."""
    argnums = tuple(argnums)

    def closed(f, base):
        def g(*diff):
            full = list(base)
            for i, a in zip(argnums, diff):
                full[i] = a
            return f(*full)

        return g

    ref_args = upcast(list(args))
    if compiler_options is None:
        out, vjp = jax.vjp(closed(fn, args), *[args[i] for i in argnums])
        with jax.default_matmul_precision("highest"):
            out_ref, vjp_ref = jax.vjp(closed(ref, ref_args), *[ref_args[i] for i in argnums])
            ct = random_cotangent(out, jax.random.key(seed + 1))
            ct_ref = jax.tree.map(
                lambda c, o: None if c is None else c.astype(o.dtype), ct, out_ref
            )
            grads_ref = vjp_ref(ct_ref)
        grads = vjp(ct)
    else:

        def out_and_grads(f, base):
            def run(diff, ct):
                out, vjp = jax.vjp(closed(f, base), *diff)
                return out, vjp(ct)

            return jax.jit(run, compiler_options=compiler_options)

        shape = jax.eval_shape(closed(fn, args), *[args[i] for i in argnums])
        ct = random_cotangent(
            jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shape), jax.random.key(seed + 1)
        )
        out, grads = out_and_grads(fn, args)([args[i] for i in argnums], ct)
        with jax.default_matmul_precision("highest"):
            out_ref, grads_ref = out_and_grads(ref, ref_args)(
                [ref_args[i] for i in argnums], upcast(ct)
            )
    flat, flat_ref = jax.tree.leaves(out), jax.tree.leaves(out_ref)
    assert len(flat) == len(flat_ref), "fn and ref return different structures"
    return list(zip(flat, flat_ref)), list(zip(grads, grads_ref))


def check_against(
    fn: Callable,
    ref: Callable,
    args: Sequence,
    *,
    argnums: Sequence[int],
    tol: float,
    grad_tol: float | Mapping[str, float] | None = None,
    seed: int = 0,
    names: Sequence[str] | None = None,
    compiler_options: dict | None = None,
) -> None:
    """Asserts that ``fn(*args)`` matches ``ref(*upcast(args))`` (the oracle in float32), and
    their VJPs for one random cotangent, within ``tol``; gradients within ``grad_tol`` (a
    number, or a mapping from a name of ``names`` to its tolerance, ``tol`` for the others).
    Outputs may be any pytree; ``argnums`` are the differentiated positions;
    ``compiler_options`` as in ``vjp_pairs``."""
    outs, grads = vjp_pairs(
        fn, ref, args, argnums=argnums, seed=seed, compiler_options=compiler_options
    )
    for i, (a, b) in enumerate(outs):
        assert_close(a, b, tol, f"output {i} (seed {seed})")
    names = names or [f"arg {i}" for i in argnums]
    for name, (a, b) in zip(names, grads):
        if isinstance(grad_tol, Mapping):
            gtol = grad_tol.get(name, tol)
        else:
            gtol = tol if grad_tol is None else grad_tol
        assert_close(a, b, gtol, f"d{name} (seed {seed})")


@contextlib.contextmanager
def abstract_device(platform: str = "cuda", device_kind: str = "NVIDIA H200"):
    """Lower for a GPU or TPU without one: ``fn.trace(...).lower(lowering_platforms=...)``
    inside this context emits the Triton or Mosaic IR that the real device would compile.
    Dispatch targets that platform too (interpret mode off), so the public ops can be
    lowered with ``implementation="pallas_triton"`` or ``"pallas_tpu"``."""
    from jax._src import mesh as mesh_lib  # private, used only for lowering

    from seqmix.kernels import dispatch

    if platform == "tpu" and device_kind == "NVIDIA H200":
        device_kind = "TPU v5e"
    dev = mesh_lib.AbstractDevice(device_kind=device_kind, num_cores=132, platform=platform)
    mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=dev)
    target = "gpu" if platform in ("cuda", "rocm", "gpu") else platform
    with (
        jax.sharding.use_abstract_mesh(mesh),
        dispatch.target_platform(target),
        dispatch.interpret(False),
    ):
        yield


def lower_for(fn: Callable, *args, platform: str = "cuda") -> str:
    """Lowers ``jax.jit(fn)(*args)`` for ``platform`` ("cuda" or "tpu") on this machine and
    returns the StableHLO text; raises where a kernel cannot be lowered there."""
    shapes = [jax.ShapeDtypeStruct(a.shape, a.dtype) if hasattr(a, "shape") else a for a in args]
    with abstract_device(platform):
        return jax.jit(fn).trace(*shapes).lower(lowering_platforms=(platform,)).as_text()
