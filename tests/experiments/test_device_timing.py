"""The device timing scripts build what they time: ``masking_cost``'s variants of each
kernel agree on clean inputs (interpret mode, small shapes), and ``time_ops``'s delta-rule
and linear-attention series cases run (XLA)."""

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqmix import testing
from seqmix.experiments.device import masking_cost
from seqmix.kernels import interpret

HERE = os.path.dirname(os.path.abspath(__file__))


def _time_ops():
    path = os.path.join(HERE, "..", "..", "seqmix", "experiments", "device", "time_ops.py")
    spec = importlib.util.spec_from_file_location("time_ops", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("op", ["linear_attention", "gated_delta_rule"])
def test_masking_cost_variants_agree_on_clean_inputs(op, monkeypatch):
    monkeypatch.setattr(masking_cost, "SHAPE", [1, 64, 2, 16])
    args, dy = masking_cost.inputs(op)
    floats = tuple(i for i, x in enumerate(args) if x is not None)
    results = {}
    with interpret():
        for name, f in masking_cost.variants(op, "pallas_triton").items():

            def loss(*xs, f=f):
                return jnp.sum((f(*xs)[0] * dy).astype(jnp.float32))

            out = jax.jit(lambda *xs, f=f: f(*xs)[0])(*args)
            results[name] = (out, jax.jit(jax.grad(loss, floats))(*args))
    names = set(results)
    assert {"unmasked", "eager", "shipped"} <= names
    assert ("cond both ways" in names) == (op == "gated_delta_rule")
    base_out, base_grads = results.pop("unmasked")
    for name, (out, grads) in results.items():
        testing.assert_close(out, base_out, 1e-2, f"{op} {name}: output")
        for d, r in zip(grads, base_grads):
            testing.assert_close(d, r, 1e-2, f"{op} {name}: gradient")


@pytest.mark.parametrize("decay", ["scalar", "channel", "none"])
def test_time_ops_series_and_delta_rule_cases_run(decay):
    time_ops = _time_ops()
    label, f, args, dy = time_ops.linear_attention_series_case(1, 32, 2, 16, decay, "xla")
    assert ("no decay" if decay == "none" else decay) in label and np.all(
        np.isfinite(np.asarray(jax.jit(f)(*args), np.float32))
    )
    assert dy.shape == args[0].shape
    label, f, args, dy = time_ops.delta_rule_case(1, 32, 2, 16, "xla")
    assert np.all(np.isfinite(np.asarray(jax.jit(f)(*args), np.float32)))
