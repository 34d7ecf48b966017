"""One Linen keyword: both ``as_linen`` functions name the module with ``name=``."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from seqmix import layers, models

CONFIG = models.model_config(
    d_model=16, vocab_size=32, mixers={"mamba2": {"headdim": 8, "d_state": 8}}
)


class Pair(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = x + models.as_linen("mamba2", CONFIG, name="by_name")(x)
        cfg = models.layer_config(CONFIG, "mamba2", causal=True)
        return x + layers.as_linen(layers.Mamba2, cfg, name="by_class")(x)


def test_both_as_linen_take_name_and_their_params_sit_under_it():
    x = jnp.ones((2, 8, 16))
    variables = Pair().init(jax.random.key(0), x)
    assert set(variables["params"]) == {"by_name", "by_class"}
    plain = nn.unbox(variables["params"])  # boxes of logical axes -> plain arrays
    a, b = (jax.tree.leaves(plain[k]) for k in ("by_name", "by_class"))
    assert [p.shape for p in a] == [p.shape for p in b]
    assert Pair().apply(variables, x).shape == x.shape


def test_the_former_keyword_is_gone():
    with pytest.raises(TypeError, match="module_name"):
        models.as_linen("mamba2", CONFIG, module_name="x")
