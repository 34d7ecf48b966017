"""Multi-query associative recall (MQAR), as in Zoology (Arora et al., 2023).

A row of length ``seq_len`` starts with ``num_kv_pairs`` key-value pairs ``k1 v1 k2 v2 ...``:
keys are distinct tokens from ``[1, vocab_size // 2)``, values tokens from
``[vocab_size // 2, vocab_size)``. Every key is then queried once in the rest of the row, at
an even offset ``2 * gap`` after the context, the gaps drawn without replacement with
probability ``p(g) ∝ power_a * g ** (power_a - 1)`` over ``g = 1 .. space`` (short gaps are
likely). At a query position the target is the key's value; only those positions count
(``mask`` = 1). Every other position after the context holds a uniformly random token
(``random_non_queries``) and is ignored by the loss.
"""

from __future__ import annotations

import numpy as np

from seqmix.data.task import Batch, Task, batches_of, check_positive, rng_for


def check(*, vocab_size: int, seq_len: int, num_kv_pairs: int, power_a: float) -> None:
    """ValueError naming the ``data.*`` key when the arguments cannot make an MQAR row."""
    check_positive(vocab_size, "data.vocab_size")
    check_positive(seq_len, "data.seq_len")
    check_positive(num_kv_pairs, "data.num_kv_pairs")
    if num_kv_pairs > vocab_size // 2 - 1:
        raise ValueError(
            f"data.num_kv_pairs={num_kv_pairs} needs at least that many distinct keys in "
            f"[1, vocab_size // 2) = [1, {vocab_size // 2}): raise data.vocab_size"
        )
    space = (seq_len - 2 * num_kv_pairs) // 2
    if space < num_kv_pairs:
        raise ValueError(
            f"data.seq_len={seq_len} leaves {space} query slots after {num_kv_pairs} key-value "
            f"pairs; need seq_len >= 4 * num_kv_pairs = {4 * num_kv_pairs}"
        )
    if not power_a > 0:
        raise ValueError(f"data.power_a must be > 0, got {power_a}")


def _distinct(rng: np.random.Generator, b: int, n: int, low: int, high: int) -> np.ndarray:
    """``[b, n]`` tokens of ``[low, high)``, distinct within each row and uniform over such
    rows: rows with a repeat are drawn again (rejection costs O(b * n), where a permutation
    of the whole range costs O(b * (high - low)): 20 ms a batch at vocabulary 8192); when
    ``n`` is a large part of the range, a permutation per row."""
    if 4 * n > high - low:
        return rng.permuted(np.broadcast_to(np.arange(low, high), (b, high - low)), axis=1)[:, :n]
    out = rng.integers(low, high, size=(b, n))
    while True:
        s = np.sort(out, axis=1)
        bad = (s[:, 1:] == s[:, :-1]).any(axis=1)
        if not bad.any():
            return out
        out[bad] = rng.integers(low, high, size=(int(bad.sum()), n))


def make_batch(
    rng: np.random.Generator,
    batch_size: int,
    *,
    vocab_size: int,
    seq_len: int,
    num_kv_pairs: int,
    power_a: float = 0.01,
    random_non_queries: bool = True,
) -> Batch:
    """One MQAR batch drawn from ``rng``: ``inputs``/``targets`` int32 and ``mask`` float32,
    all ``[batch_size, seq_len]``, and ``positions`` int32 ``[batch_size, num_kv_pairs]``:
    the query positions (where ``mask`` is 1), ascending. The trainer computes logits only
    there (the other positions carry no loss), which saves ``seq_len / num_kv_pairs`` of the
    vocabulary projection's work."""
    check(vocab_size=vocab_size, seq_len=seq_len, num_kv_pairs=num_kv_pairs, power_a=power_a)
    b, n, t = batch_size, num_kv_pairs, seq_len
    half = vocab_size // 2
    context = 2 * n
    # Distinct keys and values per row, uniform over ordered n-tuples of distinct tokens.
    keys = _distinct(rng, b, n, 1, half)
    values = _distinct(rng, b, n, half, vocab_size)
    # Gaps without replacement with power-law weights: Gumbel top-k is exactly sequential
    # weighted sampling without replacement.
    space = (t - context) // 2
    g = np.arange(1, space + 1, dtype=np.float64)
    log_p = np.log(power_a) + (power_a - 1.0) * np.log(g)
    scores = log_p[None, :] + rng.gumbel(size=(b, space))
    gaps = np.argsort(-scores, axis=1, kind="stable")[:, :n]  # 0-based slot index

    inputs = np.zeros((b, t), np.int64)
    inputs[:, 0:context:2] = keys
    inputs[:, 1:context:2] = values
    query_pos = context + 2 * gaps
    rows = np.arange(b)[:, None]
    inputs[rows, query_pos] = keys
    targets = np.zeros((b, t), np.int64)
    targets[rows, query_pos] = values
    mask = np.zeros((b, t), np.float32)
    mask[rows, query_pos] = 1.0
    if random_non_queries:
        noise = rng.integers(0, vocab_size, size=(b, t))
        inputs = np.where(inputs == 0, noise, inputs)
    return {
        "inputs": inputs.astype(np.int32),
        "targets": targets.astype(np.int32),
        "mask": mask,
        "positions": np.sort(query_pos, axis=1).astype(np.int32),
    }


def batch(seed: int, stream: int, index: int, batch_size: int, **kwargs) -> Batch:
    """The batch of ``(seed, stream, index)``: a pure function (see ``make_batch``)."""
    return make_batch(rng_for(seed, stream, index), batch_size, **kwargs)


def task(data, *, seed: int, batch_size: int, eval_batch_size: int) -> Task:
    """The MQAR task of a ``config.data`` (keys vocab_size, seq_len, num_kv_pairs, power_a,
    random_non_queries, num_eval_batches)."""
    kwargs = dict(
        vocab_size=data.vocab_size,
        seq_len=data.seq_len,
        num_kv_pairs=data.num_kv_pairs,
        power_a=float(data.get("power_a", 0.01)),
        random_non_queries=bool(data.get("random_non_queries", True)),
    )
    check(**{k: kwargs[k] for k in ("vocab_size", "seq_len", "num_kv_pairs", "power_a")})
    return Task(
        name="mqar",
        kind="causal_lm",
        vocab_size=data.vocab_size,
        seq_len=data.seq_len,
        batch=batches_of(batch, seed, **kwargs),
        batch_size=batch_size,
        eval_batch_size=eval_batch_size,
        num_eval_batches=check_positive(data.num_eval_batches, "data.num_eval_batches"),
    )
