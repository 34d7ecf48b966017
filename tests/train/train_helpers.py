"""Shared by the training tests and their subprocess runner: a tiny config and param access.

Also a script, run in a subprocess by the tests:

    python tests/train/train_helpers.py CONFIG_JSON WORKDIR [--sigkill-at N] [--sigterm-at N]
        [--break-checkpoints-at N] [--limit-file-size-at N] [--on-config-change POLICY]

trains the config (with ``seqmix.train.train_and_evaluate``) and, from a callback once step
N's metrics have been read, sends itself SIGKILL or SIGTERM, replaces the checkpoint
directory by a file, or limits the size of every file it writes to 4 kB (what a full disk
does to a write). A checkpoint that cannot be written ends the process as the launcher
does: ``SAVE FAILED <message>`` on stdout and exit status 3, without waiting for orbax.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import sys

import ml_collections
import numpy as np


def tiny_config(**train_overrides) -> ml_collections.ConfigDict:
    """A 1-layer attention model on a small MQAR: a few milliseconds per step on a CPU."""
    from seqmix.models import model_config
    from seqmix.train import base_config

    model = model_config(
        kind="causal_lm",
        vocab_size=16,
        d_model=16,
        layers=["attention"],
        mlp=None,
        mixers={"attention": {"num_heads": 2}},
    )
    config = base_config(model=model)
    config.data = ml_collections.ConfigDict(
        dict(
            task="mqar",
            vocab_size=16,
            seq_len=16,
            num_kv_pairs=2,
            power_a=0.01,
            random_non_queries=True,
            num_eval_batches=1,
        )
    )
    config.train.update(
        dict(num_steps=12, batch_size=8, eval_every=0, checkpoint_every=4, log_every=1, keep=10)
    )
    config.train.update(train_overrides)
    config.optimizer.warmup_steps = 2
    config.optimizer.lr = 1e-2
    return config


def checkpoint_arrays(workdir: str, step: int) -> dict[str, np.ndarray]:
    """Every array of a checkpoint (parameters and optimizer state), by path."""
    import orbax.checkpoint as ocp

    path = os.path.join(workdir, "checkpoints", str(step))
    out = {}
    with ocp.StandardCheckpointer() as ckptr:
        for item in ("params", "train"):
            tree = ckptr.restore(os.path.join(path, item))
            flat = _flatten(tree, item)
            out.update(flat)
    return out


def _flatten(tree, prefix) -> dict:
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}/{k}"))
        return out
    return {prefix: np.asarray(tree)}


def assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert np.array_equal(a[k], b[k]), (
            f"{k} differs (max |diff| "
            f"{np.max(np.abs(a[k].astype(np.float64) - b[k].astype(np.float64)))})"
        )


FILE_SIZE_LIMIT = 4096


def main(argv) -> int:
    config_path, workdir, *rest = argv
    at = {
        "--sigkill-at": None,
        "--sigterm-at": None,
        "--break-checkpoints-at": None,
        "--limit-file-size-at": None,
    }
    policy = "refuse"
    while rest:
        flag, value, *rest = rest
        if flag == "--on-config-change":
            policy = value
        else:
            at[flag] = int(value)
    with open(config_path) as f:
        config = ml_collections.ConfigDict(json.load(f))

    def callback(step, metrics):
        del metrics
        if step == at["--sigkill-at"]:
            os.kill(os.getpid(), signal.SIGKILL)
        if step == at["--sigterm-at"]:
            os.kill(os.getpid(), signal.SIGTERM)
        if step == at["--break-checkpoints-at"]:
            path = os.path.join(workdir, "checkpoints")
            shutil.rmtree(path)
            with open(path, "w") as f:
                f.write("a file where the checkpoint directory should be\n")
        if step == at["--limit-file-size-at"]:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write fails instead (EFBIG)
            resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_SIZE_LIMIT, resource.RLIM_INFINITY))

    from seqmix.train import CheckpointSaveError, train_and_evaluate

    try:
        result = train_and_evaluate(config, workdir, callbacks=[callback], on_config_change=policy)
    except CheckpointSaveError as e:
        print(f"SAVE FAILED {e}", flush=True)
        os._exit(3)
    print(
        "RESULT " + json.dumps({k: result[k] for k in ("step", "stopped_by", "event")}),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))


def jax_backends_started() -> tuple[bool, str | None]:
    """Whether this process has started a JAX backend, and the platforms it would start
    (for a batch process: none started, and the CPU only)."""
    import jax
    from jax._src import xla_bridge

    return xla_bridge.backends_are_initialized(), jax.config.jax_platforms
