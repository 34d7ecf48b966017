"""Every mixer's training step and decoding step lower for an H200 and a TPU on this CPU,
with auto dispatch choosing the Pallas kernels there (nothing runs: this catches a kernel
that the device would refuse to build from a model's real shapes)."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from seqmix import testing
from seqmix.models import MIXERS, build_model, model_config


def _model():
    """The model with every mixer, abstract (its arrays are shapes: lowering needs no more)."""
    config = model_config(
        layers=sorted(MIXERS),
        d_model=64,
        vocab_size=128,
        dtype="bfloat16",
        mixers={
            "attention": {"num_heads": 2},
            "based": {"num_heads": 2},
            "linear_attention": {"num_heads": 2},
            "retnet": {"num_heads": 2},
            "gla": {"num_heads": 2},
            "mamba2": {"headdim": 32, "d_state": 16},
        },
    )
    return nnx.eval_shape(lambda: build_model(config, rngs=nnx.Rngs(0)))


@pytest.mark.parametrize("platform,kernel", [("cuda", "triton"), ("tpu", "tpu_custom_call")])
def test_training_step_lowers_with_pallas_kernels(platform, kernel):
    model = _model()
    graphdef, params = nnx.split(model, nnx.Param)
    tokens = jnp.zeros((2, 128), jnp.int32)

    def loss(params, tokens):
        logits = nnx.merge(graphdef, params)(tokens)
        return jnp.mean(logits.astype(jnp.float32))

    text = testing.lower_for(jax.grad(loss), params, tokens, platform=platform)
    if platform == "cuda":
        # auto dispatch chose the Pallas Triton kernels for every op family on a "GPU"
        assert text.count("__gpu$xla.gpu.triton") >= 4
    else:
        # TPU auto dispatch stays on XLA until the TPU kernels are measured
        assert kernel not in text


def test_decoding_step_lowers_for_gpu():
    model = _model()
    cache = model.init_cache(2, 64)
    graphdef, state = nnx.split(model)

    def step(state, token, cache):
        return nnx.merge(graphdef, state)(token, cache=cache)

    text = testing.lower_for(step, state, jnp.zeros((2, 1), jnp.int32), cache, platform="cuda")
    assert "__gpu$xla.gpu.triton" in text


def test_training_step_vmapped_over_parameters_lowers_for_gpu():
    """The recall sweep trains several learning rates as one step vmapped over a leading
    axis of the parameters: the Pallas kernels must batch (pallas_call's batching rule)."""
    model = _model()
    graphdef, params = nnx.split(model, nnx.Param)
    stacked = jax.tree.map(lambda x: jax.ShapeDtypeStruct((2, *x.shape), x.dtype), params)
    tokens = jnp.zeros((2, 128), jnp.int32)

    def loss(params, tokens):
        logits = nnx.merge(graphdef, params)(tokens)
        return jnp.mean(logits.astype(jnp.float32))

    text = testing.lower_for(
        jax.vmap(jax.grad(loss), in_axes=(0, None)), stacked, tokens, platform="cuda"
    )
    assert text.count("__gpu$xla.gpu.triton") >= 4
