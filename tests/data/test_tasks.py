"""The data tasks: pure functions of (seed, step), fixed evaluation sets, task structure."""

from __future__ import annotations

import random

import ml_collections
import numpy as np
import pytest

from seqmix import data
from seqmix.data import bytes_lm, copying, listops, mqar

MQAR = dict(vocab_size=64, seq_len=64, num_kv_pairs=8)
COPY = dict(vocab_size=12, seq_len=40, num_tokens=6)
LISTOPS = dict(seq_len=120, max_depth=5, max_args=5, min_length=20, max_length=120)


def _config(task, **data_keys):
    return ml_collections.ConfigDict(
        {
            "seed": 3,
            "data": {"task": task, "num_eval_batches": 2, **data_keys},
            "train": {"batch_size": 4, "eval_batch_size": None},
        }
    )


TASK_CONFIGS = {
    "mqar": MQAR,
    "copying": COPY,
    "listops": LISTOPS,
    "bytes": dict(seq_len=32),
}


@pytest.fixture(scope="module")
def byte_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("bytes"))


def _task(name, byte_dir):
    keys = dict(TASK_CONFIGS[name])
    if name == "bytes":
        keys["data_dir"] = byte_dir
    return data.make_task(_config(name, **keys))


def _equal(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", sorted(TASK_CONFIGS))
def test_batches_are_pure_functions_of_seed_and_step(name, byte_dir):
    task = _task(name, byte_dir)
    first = task.train_batch(7)
    task.train_batch(8)  # no hidden state: other calls in between change nothing
    assert _equal(first, _task(name, byte_dir).train_batch(7))
    assert not _equal(first, task.train_batch(8))
    other_seed = data.make_task(_with_seed(name, byte_dir, 4))
    assert not _equal(first, other_seed.train_batch(7))
    assert first["inputs"].dtype == np.int32 and first["inputs"].shape == (4, task.seq_len)
    assert first["inputs"].min() >= 0 and first["inputs"].max() < task.vocab_size


def task_keys(name, byte_dir):
    keys = dict(TASK_CONFIGS[name])
    if name == "bytes":
        keys["data_dir"] = byte_dir
    return keys


def _with_seed(name, byte_dir, seed):
    config = _config(name, **task_keys(name, byte_dir))
    config.seed = seed
    return config


@pytest.mark.parametrize("name", sorted(TASK_CONFIGS))
def test_eval_set_is_fixed_and_differs_from_training(name, byte_dir):
    a, b = _task(name, byte_dir).eval_batches(), _task(name, byte_dir).eval_batches()
    assert len(a) == 2 and all(_equal(x, y) for x, y in zip(a, b))
    train = _task(name, byte_dir)
    assert not any(_equal(a[0], train.train_batch(i)) for i in range(3))


def test_mqar_structure():
    b = mqar.batch(0, 0, 5, 16, **MQAR)
    x, y, m = b["inputs"], b["targets"], b["mask"]
    half, n = MQAR["vocab_size"] // 2, MQAR["num_kv_pairs"]
    keys, values = x[:, 0 : 2 * n : 2], x[:, 1 : 2 * n : 2]
    assert ((keys >= 1) & (keys < half)).all()
    assert ((values >= half) & (values < MQAR["vocab_size"])).all()
    for row in range(16):
        assert len(set(keys[row])) == n  # distinct keys per row
        kv = dict(zip(keys[row], values[row]))
        answer = np.flatnonzero(m[row])
        assert len(answer) == n  # each key queried exactly once
        np.testing.assert_array_equal(b["positions"][row], answer)  # the loss positions
        assert (answer >= 2 * n).all() and ((answer - 2 * n) % 2 == 0).all()
        assert sorted(x[row, answer]) == sorted(keys[row])
        for pos in answer:  # the target at a query is the value of the queried key
            assert y[row, pos] == kv[x[row, pos]]
    assert (y[m == 0] == 0).all()


def test_mqar_gaps_follow_a_power_law():
    # Short gaps are more likely: query offsets concentrate near the end of the context.
    b = mqar.batch(1, 0, 0, 256, vocab_size=256, seq_len=256, num_kv_pairs=4)
    offsets = (np.nonzero(b["mask"])[1] - 8) // 2
    assert np.mean(offsets < 20) > 0.3 and offsets.max() > 40


def test_mqar_rejects_impossible_sizes():
    with pytest.raises(ValueError, match=r"data.num_kv_pairs"):
        mqar.batch(0, 0, 0, 2, vocab_size=8, seq_len=64, num_kv_pairs=8)
    with pytest.raises(ValueError, match=r"data.seq_len"):
        mqar.batch(0, 0, 0, 2, vocab_size=64, seq_len=20, num_kv_pairs=8)


def test_selective_copying_structure():
    b = copying.batch(0, 0, 2, 8, **COPY)
    n, region = COPY["num_tokens"], COPY["seq_len"] - COPY["num_tokens"]
    x, y, m = b["inputs"], b["targets"], b["mask"]
    assert (x[:, region:] == copying.MARKER).all()
    assert (m[:, :region] == 0).all() and (m[:, region:] == 1).all()
    for row in range(8):
        data_tokens = x[row, :region][x[row, :region] != copying.NOISE]
        assert len(data_tokens) == n and (data_tokens >= 2).all()
        np.testing.assert_array_equal(y[row, region:], data_tokens)  # in order


def _median_floor(args):
    s = sorted(args)
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) // 2


def _evaluate_listops(text: str) -> int:
    """An independent evaluator: a stack machine over the printed expression."""
    stack: list = []
    for tok in text.split():
        if tok.startswith("["):
            stack.append([tok])
        elif tok == "]":
            op, *args = stack.pop()
            value = {"[MIN": min, "[MAX": max, "[MED": _median_floor, "[SM": lambda a: sum(a) % 10}[
                op
            ](args)
            if stack:
                stack[-1].append(value)
            else:
                return value
        else:
            value = int(tok)
            if stack:
                stack[-1].append(value)
            else:
                return value
    raise AssertionError(f"unbalanced expression {text!r}")


def test_listops_values_match_an_independent_evaluator():
    b = listops.batch(5, 0, 0, 64, **LISTOPS)
    for row in range(64):
        tokens = b["inputs"][row][b["segment_ids"][row] == 1]
        assert (b["inputs"][row][b["segment_ids"][row] == 0] == listops.PAD).all()
        assert LISTOPS["min_length"] < len(tokens) < LISTOPS["max_length"]
        assert _evaluate_listops(listops.to_string(tokens)) == b["targets"][row]


def test_listops_median_and_sum_mod():
    assert _evaluate_listops("[MED 1 9 4 8 ]") == listops.apply("[MED", [1, 9, 4, 8]) == 6
    assert _evaluate_listops("[SM 9 9 3 ]") == listops.apply("[SM", [9, 9, 3]) == 1


def test_listops_respects_depth_and_arguments():
    rng = random.Random(0)
    for _ in range(20):
        tokens, _ = listops.sample(rng, max_depth=4, max_args=3, min_length=5, max_length=500)
        depth = max_depth = 0
        args = [0]
        for t in tokens:
            if listops.OP0 <= t < listops.CLOSE:
                depth += 1
                max_depth = max(max_depth, depth)
                args.append(0)
            elif t == listops.CLOSE:
                depth -= 1
                assert 2 <= args.pop() <= 3
                args[-1] += 1
            else:
                args[-1] += 1
        assert max_depth <= 3  # operators above the leaves, at depths 1..max_depth-1


def test_listops_lra_default_lengths():
    b = listops.batch(0, 0, 0, 4, seq_len=2000)
    lengths = b["segment_ids"].sum(1)
    assert ((lengths > 500) & (lengths < 2000)).all()


def test_bytes_split_is_deterministic_and_disjoint(byte_dir):
    meta = bytes_lm.build(byte_dir)
    files = bytes_lm.source_files()
    val = [f for f in files if bytes_lm.is_validation(f, 0.05)]
    assert 0 < len(val) < len(files) / 5
    assert meta["val_files"] == len(val) and meta["train_files"] == len(files) - len(val)
    train = bytes_lm.open_split(byte_dir, "train")
    assert isinstance(train, np.memmap) and train.dtype == np.uint8
    assert len(train) == meta["train_bytes"]
    b = bytes_lm.batch(0, 0, 3, 4, seq_len=32, data_dir=byte_dir)
    np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])
    assert (b["mask"] == 1).all()


def test_unknown_task_names_the_key():
    with pytest.raises(ValueError, match=r"data.task"):
        data.make_task(_config("nope"))


@pytest.mark.parametrize("n,low,high", [(3, 1, 200), (6, 4, 10)])  # rejection; permutation
def test_mqar_distinct_tokens_are_uniform(n, low, high):
    rng = np.random.default_rng(0)
    rows = mqar._distinct(rng, 4000, n, low, high)
    assert rows.shape == (4000, n) and rows.min() >= low and rows.max() < high
    assert all(len(set(r)) == n for r in rows)
    # every token equally likely in every column (uniform over ordered distinct tuples)
    counts = np.stack([np.bincount(rows[:, j] - low, minlength=high - low) for j in range(n)])
    expected = 4000 / (high - low)
    assert np.abs(counts - expected).max() < 6 * np.sqrt(expected)
