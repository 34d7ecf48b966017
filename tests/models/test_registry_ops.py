"""The registry's ops per mixer are the ops each mixer calls: every mixer's forward and
decoding steps, run with the options that reach all of its code paths (the layer tests'
cases, and the short convolution where a mixer has one), call exactly the ``seqmix.kernels`` ops that ``registry.OPS`` lists."""

from __future__ import annotations

import jax
import pytest
from flax import nnx
from layers.cases import CASES, config_for

from seqmix.kernels import dispatch
from seqmix.models import registry


def _ops_called(name: str, overrides: dict) -> set[str]:
    called = set()
    original = dispatch.Op.__call__

    def spy(self, *args, **kwargs):
        called.add(self.name)
        return original(self, *args, **kwargs)

    mixer = registry.build_mixer(name, config_for(name, overrides), causal=True, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (2, 5, 32))

    def run(x):
        mixer(x)
        cache = mixer.init_cache(2, 5)
        for t in range(2):
            _, cache = mixer(x[:, t : t + 1], cache=cache)
        _, cache = mixer(x[:, 2:5], cache=cache)  # several tokens at once
        return cache

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dispatch.Op, "__call__", spy)
        jax.eval_shape(run, x)  # traced as under jit: the ops are called, nothing runs
    return called


@pytest.mark.parametrize("name", sorted(registry.MIXERS))
def test_ops_are_the_ones_each_mixer_calls(name):
    called = set()
    cases = [overrides for _, case_name, overrides in CASES if case_name == name]
    if "short_conv" in registry.MIXERS[name].default_config():
        cases.append({"short_conv": True})  # the optional convolution's ops
    for overrides in cases:
        called |= _ops_called(name, overrides)
    assert called == set(registry.mixer_ops(name)), (name, sorted(called))


def test_listing_names_the_implementations_here():
    native, interpreted = registry.implementations_here("attention")
    assert {"naive", "xla"} <= set(native)
    if dispatch.platform() == "cpu":
        assert set(interpreted) == {"pallas_triton", "pallas_tpu"}
    table = registry.describe()
    for name in registry.MIXERS:
        for op in registry.mixer_ops(name):
            assert f"| {name} | {op} |" in table
    with pytest.raises(ValueError, match="unknown op"):
        registry.implementations_here("convolution")
