"""ListOps by the Long Range Arena procedure (Nangia & Bowman, 2018; Tay et al., 2021).

An expression is a tree: each node is a leaf digit ``0..9`` or an operator over 2 to
``max_args`` arguments: ``MIN``, ``MAX``, ``MED`` (median, rounded down to an int) and
``SM`` (sum modulo 10). Written in prefix form, e.g. ``[MAX 2 9 [MIN 4 7 ] 0 ]`` (value 9).
As in LRA's generator a node below ``max_depth`` is a leaf with probability 0.75 and an
operator otherwise; at ``max_depth`` it is a leaf. A tree's length counts one token per digit,
operator and closing bracket; trees are drawn until ``min_length < length < max_length``
(LRA's strict bounds). The target is the value ``0..9`` (10 classes).

Tokens: 0 padding, 1..10 digits 0..9, 11..14 ``[MIN [MAX [MED [SM``, 15 ``]``. Rows are padded
with 0 to ``seq_len`` (>= ``max_length - 1``); ``segment_ids`` marks tokens (1) and padding (0).
"""

from __future__ import annotations

import random

import numpy as np

from seqmix.data.task import Batch, Task, batches_of, check_positive

PAD = 0
DIGIT0 = 1
OPERATORS = ("[MIN", "[MAX", "[MED", "[SM")
OP0 = 11
CLOSE = 15
VOCAB_SIZE = 16
NUM_CLASSES = 10
LEAF_PROBABILITY = 0.75  # LRA: r > VALUE_P (0.25) makes a leaf

TOKEN_NAMES = ["<pad>"] + [str(d) for d in range(10)] + list(OPERATORS) + ["]"]


def apply(op: str, args: list[int]) -> int:
    """The value of an operator on its arguments (LRA's definitions)."""
    if op == "[MIN":
        return min(args)
    if op == "[MAX":
        return max(args)
    if op == "[MED":
        return int(np.median(args))
    if op == "[SM":
        return sum(args) % 10
    raise ValueError(f"unknown ListOps operator {op!r}")


def _tree(rng: random.Random, depth: int, max_depth: int, max_args: int, out: list[int]) -> int:
    """Appends the tokens of one random tree to ``out``; returns its value."""
    if depth >= max_depth or rng.random() < LEAF_PROBABILITY:
        value = rng.randrange(10)
        out.append(DIGIT0 + value)
        return value
    op = rng.randrange(len(OPERATORS))
    out.append(OP0 + op)
    args = [
        _tree(rng, depth + 1, max_depth, max_args, out) for _ in range(rng.randint(2, max_args))
    ]
    out.append(CLOSE)
    return apply(OPERATORS[op], args)


def sample(
    rng: random.Random, *, max_depth: int, max_args: int, min_length: int, max_length: int
) -> tuple[list[int], int]:
    """One expression with ``min_length < len < max_length``: (tokens, value)."""
    while True:
        tokens: list[int] = []
        value = _tree(rng, 1, max_depth, max_args, tokens)
        if min_length < len(tokens) < max_length:
            return tokens, value


def to_string(tokens) -> str:
    return " ".join(TOKEN_NAMES[t] for t in tokens if t != PAD)


def check(*, seq_len, max_depth, max_args, min_length, max_length) -> None:
    check_positive(max_depth, "data.max_depth")
    check_positive(max_args, "data.max_args")
    check_positive(min_length, "data.min_length", allow_zero=True)
    check_positive(max_length, "data.max_length")
    check_positive(seq_len, "data.seq_len")
    if max_args < 2:
        raise ValueError(f"data.max_args must be >= 2, got {max_args}")
    if max_length - min_length < 2:
        raise ValueError(
            f"data.min_length={min_length} and data.max_length={max_length} leave no length "
            "strictly between them"
        )
    if seq_len < max_length - 1:
        raise ValueError(
            f"data.seq_len={seq_len} must be >= data.max_length - 1 = {max_length - 1}"
        )
    # The longest possible tree must be able to exceed min_length (else sampling never ends).
    longest = 1
    for _ in range(max_depth - 1):
        longest = 2 + max_args * longest
    if longest <= min_length:
        raise ValueError(
            f"data.min_length={min_length} is unreachable with max_depth={max_depth} and "
            f"max_args={max_args} (longest tree has {longest} tokens)"
        )


def make_batch(
    rng: random.Random,
    batch_size: int,
    *,
    seq_len: int,
    max_depth: int = 10,
    max_args: int = 10,
    min_length: int = 500,
    max_length: int = 2000,
) -> Batch:
    """``inputs``/``segment_ids`` int32 ``[batch_size, seq_len]``, ``targets`` int32
    ``[batch_size]``."""
    check(
        seq_len=seq_len,
        max_depth=max_depth,
        max_args=max_args,
        min_length=min_length,
        max_length=max_length,
    )
    inputs = np.zeros((batch_size, seq_len), np.int32)
    targets = np.zeros((batch_size,), np.int32)
    for i in range(batch_size):
        tokens, value = sample(
            rng,
            max_depth=max_depth,
            max_args=max_args,
            min_length=min_length,
            max_length=max_length,
        )
        inputs[i, : len(tokens)] = tokens
        targets[i] = value
    return {"inputs": inputs, "segment_ids": (inputs != PAD).astype(np.int32), "targets": targets}


def batch(seed: int, stream: int, index: int, batch_size: int, **kwargs) -> Batch:
    """The batch of ``(seed, stream, index)``: a pure function. Python's ``random`` seeded by a
    string is deterministic across processes and platforms (it hashes with SHA-512)."""
    if seed < 0 or index < 0:
        raise ValueError(f"seed and step must be >= 0, got seed={seed}, step={index}")
    return make_batch(random.Random(f"listops/{seed}/{stream}/{index}"), batch_size, **kwargs)


def task(data, *, seed: int, batch_size: int, eval_batch_size: int) -> Task:
    """The ListOps task of a ``config.data`` (keys seq_len, max_depth, max_args, min_length,
    max_length, num_eval_batches)."""
    kwargs = dict(
        seq_len=data.seq_len,
        max_depth=data.max_depth,
        max_args=data.max_args,
        min_length=data.min_length,
        max_length=data.max_length,
    )
    check(**kwargs)
    return Task(
        name="listops",
        kind="classifier",
        vocab_size=VOCAB_SIZE,
        seq_len=data.seq_len,
        num_classes=NUM_CLASSES,
        batch=batches_of(batch, seed, **kwargs),
        batch_size=batch_size,
        eval_batch_size=eval_batch_size,
        num_eval_batches=check_positive(data.num_eval_batches, "data.num_eval_batches"),
    )
