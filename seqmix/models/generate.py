"""Sampling from a ``CausalLM`` with its decoding caches: temperature, top-k, top-p, stop
tokens."""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from seqmix import checks

Array = jax.Array


def _whole(value, name: str, *, minimum: int) -> int:
    """``value`` as an int (Python, NumPy or JAX integer scalars); ValueError naming
    ``name`` for a bool, a float or a number below ``minimum``."""
    if isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be an integer >= {minimum}, got the bool {value!r}")
    if isinstance(value, jax.Array) and value.ndim == 0:
        if not jnp.issubdtype(value.dtype, jnp.integer):
            raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
        value = int(value)
    if not isinstance(value, numbers.Integral):
        raise ValueError(
            f"{name} must be an integer >= {minimum}, got {value!r} ({type(value).__name__})"
        )
    if int(value) < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value}")
    return int(value)


def _number(value, name: str) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Real, jax.Array)):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    return value


def generate(
    model,
    prompt: Array,
    max_new_tokens: int | None = None,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_tokens: Iterable[int] | int | None = None,
    pad_token: int = -1,
    new_tokens_only: bool = False,
    rng: Array | None = None,
    num_steps: int | None = None,
) -> Array:
    """Continues ``prompt`` by up to ``max_new_tokens`` tokens.

    The prompt is processed in one call (prefill: every mixer's multi-token cache path),
    then one token per step; the whole loop is one jitted ``lax.while_loop`` (it ends early
    once every row has emitted a stop token), compiled once per model structure, prompt
    shape, ``max_new_tokens`` and whether top-k/top-p are on.

    Each new token is drawn from the logits at the previous position: the argmax when
    ``temperature == 0``; otherwise a sample of ``softmax(logits / temperature)`` restricted
    to the ``top_k`` most likely tokens and to the smallest set of most likely tokens whose
    probability reaches ``top_p`` (nucleus sampling; the most likely token always stays).

    Args:
      model: a ``CausalLM`` (anything with ``init_cache`` and ``__call__(tokens, cache=)``).
      prompt: int ``[B, T0]``, ``T0 >= 1``, every token in ``[0, model.vocab_size)``
        (checked when the prompt is a concrete array).
      max_new_tokens: number of new tokens, an integer >= 0 (``num_steps`` is the same
        argument under its former name).
      temperature: >= 0 and finite; 0 is greedy (deterministic).
      top_k: None (off) or an integer >= 1 (more than the vocabulary keeps all).
      top_p: None (off) or a number in (0, 1].
      stop_tokens: a token id or ids; a row ends after emitting one (the stop token is
        kept), later positions hold ``pad_token``.
      pad_token: the value after a row's stop token (default -1: never a token id).
      new_tokens_only: return only the new tokens ``[B, max_new_tokens]``.
      rng: a ``jax.random`` key, required when ``temperature > 0``.

    Returns:
      int32 ``[B, T0 + max_new_tokens]`` (the prompt followed by the new tokens), or
      ``[B, max_new_tokens]`` with ``new_tokens_only``.

    Raises:
      ValueError naming the argument: a prompt that is not an int ``[B, T0 >= 1]`` array
      or holds tokens outside the vocabulary; ``max_new_tokens`` not a whole number >= 0;
      ``temperature`` negative or not finite (NaN, inf); ``top_k``/``top_p`` out of range;
      stop tokens outside the vocabulary; ``rng`` missing for sampling; a model that cannot
      decode (a classifier: no ``init_cache``).
    """
    if num_steps is not None:
        if max_new_tokens is not None:
            raise ValueError("give max_new_tokens or num_steps (its former name), not both")
        max_new_tokens, name = num_steps, "num_steps"
    else:
        name = "max_new_tokens"
    if max_new_tokens is None:
        raise ValueError("max_new_tokens is required (the number of tokens to add)")
    n = _whole(max_new_tokens, name, minimum=0)
    if not hasattr(model, "init_cache") or not hasattr(model, "vocab_size"):
        raise ValueError(
            f"model must be a causal language model (a CausalLM, with init_cache and "
            f"vocab_size) to generate, got {type(model).__name__}"
        )
    vocab = int(model.vocab_size)
    prompt = jnp.asarray(prompt)
    if prompt.ndim != 2 or prompt.shape[1] < 1 or not jnp.issubdtype(prompt.dtype, jnp.integer):
        raise ValueError(
            f"prompt must be an int array [batch, time >= 1], got "
            f"{prompt.dtype}{list(prompt.shape)}"
        )
    if checks.is_concrete(prompt):
        checks.id_range(prompt, vocab, "prompt")
    temperature = _number(temperature, "temperature")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None:
        top_k = min(_whole(top_k, "top_k", minimum=1), vocab)
    if top_p is not None:
        top_p = _number(top_p, "top_p")
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if stop_tokens is None:
        stops = []
    elif isinstance(stop_tokens, (numbers.Integral, np.integer)) and not isinstance(
        stop_tokens, bool
    ):
        stops = [int(stop_tokens)]
    else:
        stops = [_whole(t, "stop_tokens", minimum=0) for t in stop_tokens]
    for t in stops:
        if t >= vocab:
            raise ValueError(f"stop_tokens: {t} is outside the vocabulary [0, {vocab})")
    pad_token = _whole(pad_token, "pad_token", minimum=-(2**31))
    if temperature > 0 and rng is None:
        raise ValueError("rng (a jax.random key) is required when temperature > 0")
    prompt = prompt.astype(jnp.int32)
    if n == 0:
        return prompt[:, :0] if new_tokens_only else prompt
    rng = jax.random.key(0) if rng is None else rng
    graphdef, state = nnx.split(model)
    new = _generate(
        graphdef,
        state,
        prompt,
        rng,
        jnp.float32(temperature),
        jnp.float32(1.0 if top_p is None else top_p),
        jnp.asarray(stops if stops else [-1], jnp.int32),
        jnp.int32(pad_token),
        num_steps=n,
        top_k=top_k,
        use_top_p=top_p is not None and top_p < 1.0,
    )
    return new if new_tokens_only else jnp.concatenate([prompt, new], axis=1)


def filter_logits(logits: Array, *, top_k: int | None, top_p: Array | None) -> Array:
    """``logits [..., V]`` (float32) with every token outside the ``top_k`` most likely and
    outside the nucleus of probability ``top_p`` set to ``-inf`` (ties at a threshold are
    kept)."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p is not None:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # probability of the tokens above
        keep = before < top_p  # the first token always (before = 0 < top_p)
        threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return logits


def _sample(logits, key, temperature, top_p, *, top_k, use_top_p):
    """argmax when ``temperature == 0``, else a sample of the filtered
    ``softmax(logits / temperature)`` (a traced temperature: greedy and sampled decoding
    share one compilation)."""
    logits = logits.astype(jnp.float32)
    greedy = jnp.argmax(logits, axis=-1)
    scaled = logits / jnp.maximum(temperature, 1e-6)
    scaled = filter_logits(scaled, top_k=top_k, top_p=top_p if use_top_p else None)
    sampled = jax.random.categorical(key, scaled, axis=-1)
    return jnp.where(temperature > 0, sampled, greedy).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "num_steps", "top_k", "use_top_p"))
def _generate(
    graphdef, state, prompt, rng, temperature, top_p, stops, pad, *, num_steps, top_k, use_top_p
):
    model = nnx.merge(graphdef, state)
    B, T0 = prompt.shape
    sample = functools.partial(_sample, top_k=top_k, use_top_p=use_top_p)
    cache = model.init_cache(B, T0 + num_steps)
    logits, cache = model(prompt, cache=cache)
    rng, key = jax.random.split(rng)
    first = sample(logits[:, -1], key, temperature, top_p)
    out = jnp.full((B, num_steps), pad, jnp.int32)
    done = jnp.zeros((B,), bool)

    def cond(carry):
        i, _, _, _, done, _ = carry
        return (i < num_steps) & ~jnp.all(done)

    def body(carry):
        i, token, cache, out, done, rng = carry
        out = out.at[:, i].set(jnp.where(done, pad, token))
        done = done | jnp.any(token[:, None] == stops[None, :], axis=-1)

        def advance(args):
            token, cache, rng = args
            logits, cache = model(token[:, None], cache=cache)
            rng, key = jax.random.split(rng)
            return sample(logits[:, 0], key, temperature, top_p), cache, rng

        token, cache, rng = jax.lax.cond(
            i + 1 < num_steps, advance, lambda args: args, (token, cache, rng)
        )
        return i + 1, token, cache, out, done, rng

    carry = (jnp.int32(0), first, cache, out, done, rng)
    return jax.lax.while_loop(cond, body, carry)[3]
