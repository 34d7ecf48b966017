"""Selective copying (Gu & Dao, 2023: the Mamba paper's synthetic task).

A row has ``seq_len`` tokens: a region of ``seq_len - num_tokens`` positions holding
``num_tokens`` data tokens at random (sorted) positions among noise tokens, followed by
``num_tokens`` marker tokens. At the ``i``-th marker the target is the ``i``-th data token
of the region, in order; only the marker positions count (``mask`` = 1). Token 0 is noise,
token 1 the marker, data tokens are drawn from ``[2, vocab_size)``. Unlike plain copying the
data positions vary from row to row, so a model must select by content, not by offset.
"""

from __future__ import annotations

import numpy as np

from seqmix.data.task import Batch, Task, batches_of, check_positive, rng_for

NOISE = 0
MARKER = 1


def check(*, vocab_size: int, seq_len: int, num_tokens: int) -> None:
    check_positive(vocab_size, "data.vocab_size")
    check_positive(seq_len, "data.seq_len")
    check_positive(num_tokens, "data.num_tokens")
    if vocab_size < 3:
        raise ValueError(f"data.vocab_size must be >= 3 (noise, marker, data), got {vocab_size}")
    if seq_len < 2 * num_tokens:
        raise ValueError(
            f"data.seq_len={seq_len} must be >= 2 * data.num_tokens = {2 * num_tokens}"
        )


def make_batch(
    rng: np.random.Generator, batch_size: int, *, vocab_size: int, seq_len: int, num_tokens: int
) -> Batch:
    """One batch drawn from ``rng``: ``inputs``/``targets`` int32 and ``mask`` float32, all
    ``[batch_size, seq_len]``."""
    check(vocab_size=vocab_size, seq_len=seq_len, num_tokens=num_tokens)
    b, n = batch_size, num_tokens
    region = seq_len - n
    data = rng.integers(2, vocab_size, size=(b, n))
    # n distinct positions per row in the region, in increasing order.
    positions = np.sort(np.argsort(rng.random((b, region)), axis=1)[:, :n], axis=1)
    rows = np.arange(b)[:, None]
    inputs = np.full((b, seq_len), NOISE, np.int32)
    inputs[rows, positions] = data
    inputs[:, region:] = MARKER
    targets = np.zeros((b, seq_len), np.int32)
    targets[:, region:] = data
    mask = np.zeros((b, seq_len), np.float32)
    mask[:, region:] = 1.0
    return {"inputs": inputs, "targets": targets, "mask": mask}


def batch(seed: int, stream: int, index: int, batch_size: int, **kwargs) -> Batch:
    return make_batch(rng_for(seed, stream, index), batch_size, **kwargs)


def task(data, *, seed: int, batch_size: int, eval_batch_size: int) -> Task:
    """The selective-copying task of a ``config.data`` (keys vocab_size, seq_len, num_tokens,
    num_eval_batches)."""
    kwargs = dict(vocab_size=data.vocab_size, seq_len=data.seq_len, num_tokens=data.num_tokens)
    check(**kwargs)
    return Task(
        name="copying",
        kind="causal_lm",
        vocab_size=data.vocab_size,
        seq_len=data.seq_len,
        batch=batches_of(batch, seed, **kwargs),
        batch_size=batch_size,
        eval_batch_size=eval_batch_size,
        num_eval_batches=check_positive(data.num_eval_batches, "data.num_eval_batches"),
    )
