"""Cross-entropy and accuracy as sums, so that means over several batches are exact.

Every function returns ``{"loss_sum", "correct", "count"}`` (float32 scalars): the summed
cross-entropy in nats, the number of argmax hits and the number of counted positions.
``finish`` turns accumulated sums into ``loss``, ``accuracy`` and, for byte-level tasks,
``bits_per_byte = loss / ln 2``; any other ``<name>_sum`` (a sum over the same counted
positions, e.g. a distillation objective's ``kl_sum``) becomes its mean ``<name>``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def token_sums(logits, targets, mask) -> dict:
    """Language-model sums: ``logits`` float ``[B, T, V]``, ``targets`` int ``[B, T]``,
    ``mask`` ``[B, T]`` (1 where the position counts)."""
    logits = logits.astype(jnp.float32)
    mask = mask.astype(jnp.float32)
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    nll = logz - picked
    hit = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return {"loss_sum": jnp.sum(nll * mask), "correct": jnp.sum(hit * mask), "count": jnp.sum(mask)}


def class_sums(logits, targets) -> dict:
    """Classification sums: ``logits`` float ``[B, C]``, ``targets`` int ``[B]``."""
    logits = logits.astype(jnp.float32)
    nll = (
        jax.nn.logsumexp(logits, axis=-1)
        - jnp.take_along_axis(logits, targets[:, None].astype(jnp.int32), axis=-1)[:, 0]
    )
    hit = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return {
        "loss_sum": jnp.sum(nll),
        "correct": jnp.sum(hit),
        "count": jnp.asarray(targets.shape[0], jnp.float32),
    }


def batch_sums(kind: str, logits, batch) -> dict:
    if kind == "causal_lm":
        targets, mask = batch["targets"], batch["mask"]
        if "positions" in batch:  # logits [B, P, V] at these positions only
            targets, mask = (
                jnp.take_along_axis(x, batch["positions"].astype(jnp.int32), axis=1)
                for x in (targets, mask)
            )
        return token_sums(logits, targets, mask)
    if kind == "classifier":
        return class_sums(logits, batch["targets"])
    raise ValueError(f"unknown task kind {kind!r}")


def finish(sums: dict, *, bits_per_byte: bool = False) -> dict:
    """Means from (accumulated) sums."""
    count = max(float(sums["count"]), 1.0)
    out = {"loss": float(sums["loss_sum"]) / count, "accuracy": float(sums["correct"]) / count}
    for key, value in sums.items():  # other per-position sums: their means
        if key.endswith("_sum") and key != "loss_sum":
            out[key[: -len("_sum")]] = float(value) / count
    if bits_per_byte:
        out["bits_per_byte"] = out["loss"] / math.log(2.0)
    return out
