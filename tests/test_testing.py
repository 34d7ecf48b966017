"""seqmix.testing: the comparison every kernel test relies on must fail where it should."""

import numpy as np
import pytest

from seqmix import testing


def test_assert_close_passes_within_tolerance():
    ref = np.linspace(-1.0, 1.0, 64, dtype=np.float32)
    testing.assert_close(ref * (1 + 1e-6), ref, 1e-5)


def test_assert_close_fails_on_error_nan_inf_and_shape():
    ref = np.linspace(-1.0, 1.0, 64, dtype=np.float32)
    with pytest.raises(AssertionError, match="relative error"):
        testing.assert_close(ref * 1.01, ref, 1e-3, "o")
    with pytest.raises(AssertionError, match="non-finite"):
        testing.assert_close(np.where(np.arange(64) == 3, np.nan, ref), ref, 1.0)
    with pytest.raises(AssertionError, match="infinities"):
        testing.assert_close(ref, np.where(np.arange(64) == 3, np.inf, ref), 1.0)
    with pytest.raises(AssertionError, match="shape"):
        testing.assert_close(ref[:-1], ref, 1.0)


def test_margins_file_lists_each_check(tmp_path, monkeypatch):
    path = tmp_path / "margins.txt"
    monkeypatch.setenv("SEQMIX_TEST_MARGINS", str(path))
    ref = np.ones(8, np.float32)
    testing.assert_close(ref * 1.001, ref, 1e-2, "dq (seed 7)")
    with pytest.raises(AssertionError):
        testing.assert_close(ref * 1.1, ref, 1e-2, "dk (seed 7)")
    lines = [line.split("\t") for line in path.read_text().splitlines()]
    assert [w for _, w, _ in lines] == ["dq (seed 7)", "dk (seed 7)"]
    assert float(lines[0][0]) == pytest.approx(0.1, rel=1e-2)  # 1e-3 of 1e-2
    assert float(lines[1][0]) == pytest.approx(10.0, rel=1e-2)
    assert all(test.startswith("tests/test_testing.py::") for _, _, test in lines)


def test_oracle_side_runs_in_float32():
    """check_against's reference sees the same values in float32, and both sides are pulled
    back through the same cotangent: a bf16 function is measured against the float32 answer,
    not against a second rounded result."""
    import jax
    import jax.numpy as jnp

    x = jax.random.normal(jax.random.key(0), (64,), jnp.float32).astype(jnp.bfloat16)
    seen = []

    def ref(x, n):
        seen.append((x.dtype, n))
        return x * x

    outs, grads = testing.vjp_pairs(lambda x, n: x * x, ref, (x, 3), argnums=(0,), seed=1)
    assert seen[0] == (jnp.float32, 3)
    ((o, o_ref),) = outs
    ((g, g_ref),) = grads
    assert o.dtype == jnp.bfloat16 and o_ref.dtype == jnp.float32
    assert g.dtype == jnp.bfloat16 and g_ref.dtype == jnp.float32
    xf = np.asarray(x, np.float32)
    np.testing.assert_array_equal(np.asarray(o_ref), xf * xf)  # exact: no rounding to bf16
    ct = np.asarray(testing.random_cotangent(o, jax.random.key(2)), np.float32)
    np.testing.assert_allclose(np.asarray(g_ref), 2 * xf * ct, rtol=1e-6)
    testing.check_against(lambda x: x * x, lambda x: x * x, (x,), argnums=(0,), tol=5e-3)


def test_grad_tolerance_per_name_and_compiled_comparison():
    """A per-gradient tolerance applies to that gradient only; the compiled path (one jit
    per side with compiler options) compares the same values."""
    import jax
    import jax.numpy as jnp

    x = jnp.linspace(0.5, 2.0, 16)
    y = jnp.linspace(-1.0, 1.0, 16)

    def fn(x, y):  # the same values; dx off by 5e-4 relative, dy exact
        return x * y + 5e-4 * (x - jax.lax.stop_gradient(x)) * y

    def ref(x, y):
        return x * y

    kw = dict(argnums=(0, 1), names="xy", tol=1e-6)
    for options in (None, {"xla_backend_optimization_level": 0}):
        testing.check_against(fn, ref, (x, y), grad_tol={"x": 1e-3}, compiler_options=options, **kw)
        with pytest.raises(AssertionError, match="dx"):
            testing.check_against(fn, ref, (x, y), compiler_options=options, **kw)


def test_native_run_follows_the_environment(monkeypatch):
    monkeypatch.setenv(testing.NATIVE_ENV, "gpu")
    assert testing.native_run()
    monkeypatch.delenv(testing.NATIVE_ENV)
    assert not testing.native_run()


def test_pytest_m_gpu_is_skipped_cleanly_without_a_gpu():
    """``pytest -m gpu`` selects the kernel cases and, on a machine without a GPU, skips them
    (exit status 0) instead of running them on the CPU."""
    import os
    import subprocess
    import sys

    import jax

    try:
        if jax.devices("gpu"):
            pytest.skip("this machine has a GPU")
    except RuntimeError:
        pass
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", testing.NATIVE_ENV)}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-m",
            "gpu",
            "-q",
            "-p",
            "no:xdist",
            "-p",
            "no:cacheprovider",
            "tests/kernels/conv1d",
        ],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "no GPU visible to JAX" in out.stdout and " passed" not in out.stdout, out.stdout[-2000:]
    assert "skipped" in out.stdout and "deselected" in out.stdout
