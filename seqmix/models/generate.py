"""Sampling from a ``CausalLM`` with its decoding caches."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

Array = jax.Array


def generate(
    model, prompt: Array, num_steps: int, *, temperature: float = 0.0, rng: Array | None = None
) -> Array:
    """Continues ``prompt`` by ``num_steps`` tokens.

    The prompt is processed in one call (prefill: every mixer's multi-token cache path),
    then one token per step; the whole loop is one jitted function (``lax.scan`` over the
    steps), compiled once per model structure, prompt shape and ``num_steps``.

    Args:
      model: a ``CausalLM`` (anything with ``init_cache`` and ``__call__(tokens, cache=)``).
      prompt: int ``[B, T0]``, ``T0 >= 1``.
      num_steps: number of new tokens (>= 0).
      temperature: 0 takes the argmax (deterministic); > 0 samples from
        ``softmax(logits / temperature)``.
      rng: a ``jax.random`` key, required when ``temperature > 0``.

    Returns:
      int32 ``[B, T0 + num_steps]``: the prompt followed by the new tokens.
    """
    prompt = jnp.asarray(prompt)
    if prompt.ndim != 2 or prompt.shape[1] < 1 or not jnp.issubdtype(prompt.dtype, jnp.integer):
        raise ValueError(
            f"prompt must be an int array [batch, time >= 1], got "
            f"{prompt.dtype}{list(prompt.shape)}"
        )
    if int(num_steps) < 0:
        raise ValueError(f"num_steps must be >= 0, got {num_steps}")
    temperature = float(temperature)
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature > 0 and rng is None:
        raise ValueError("rng (a jax.random key) is required when temperature > 0")
    prompt = prompt.astype(jnp.int32)
    if int(num_steps) == 0:
        return prompt
    rng = jax.random.key(0) if rng is None else rng
    graphdef, state = nnx.split(model)
    return _generate(
        graphdef, state, prompt, rng, jnp.float32(temperature), num_steps=int(num_steps)
    )


def _sample(logits: Array, key: Array, temperature: Array) -> Array:
    """argmax when ``temperature == 0``, else a sample of ``softmax(logits / temperature)``
    (a traced temperature: greedy and sampled decoding share one compilation)."""
    greedy = jnp.argmax(logits, axis=-1)
    sampled = jax.random.categorical(key, logits / jnp.maximum(temperature, 1e-6), axis=-1)
    return jnp.where(temperature > 0, sampled, greedy).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "num_steps"))
def _generate(graphdef, state, prompt, rng, temperature, *, num_steps):
    model = nnx.merge(graphdef, state)
    B, T0 = prompt.shape
    cache = model.init_cache(B, T0 + num_steps)
    logits, cache = model(prompt, cache=cache)
    keys = jax.random.split(rng, num_steps)
    first = _sample(logits[:, -1], keys[0], temperature)

    def step(carry, key):
        token, cache = carry
        logits, cache = model(token[:, None], cache=cache)
        return (_sample(logits[:, 0], key, temperature), cache), token

    (last, _), tokens = jax.lax.scan(step, (first, cache), keys[1:])
    return jnp.concatenate([prompt, tokens.T, last[:, None]], axis=1)
