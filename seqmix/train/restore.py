"""``restore_model(workdir)``: the trained model of a run directory, in eval mode."""

from __future__ import annotations

import logging
import os

import jax
import ml_collections
from flax import nnx

from seqmix.train import checkpoint as checkpoint_lib
from seqmix.train import sharding as sharding_lib
from seqmix.train import steps as steps_lib
from seqmix.train import workdir as workdir_lib

CHECKPOINT_DIR = "checkpoints"


def restore_model(workdir: str, step: int | None = None, *, mesh_config=None):
    """``(model, config)`` from a workdir's checkpoint (the newest readable one when ``step``
    is None), in eval mode, built from the config in force there
    (``seqmix.train.workdir.load_config``). Parameters land on the default device, or
    sharded over ``make_mesh(mesh_config)`` when a mesh config is given (any mesh, whatever
    the one the run used).

    Errors say what is wrong: FileNotFoundError for a missing workdir, a directory that
    holds no run, or a run that has saved no checkpoint yet; ValueError for a ``step``
    without a checkpoint (listing those there) and for a config that no longer builds;
    ``CheckpointMismatchError`` (a ValueError) when the checkpoint's arrays do not fit the
    config's model (naming the arrays); RuntimeError when every checkpoint is unreadable.
    """
    workdir = os.path.abspath(os.path.expanduser(workdir))
    config = workdir_lib.load_config(workdir)
    model_config = steps_lib.model_config_of(config)
    seed = int(config.seed)
    try:
        parts = steps_lib.split_model(model_config, seed)
    except ValueError as e:
        raise ValueError(
            f"the config of {workdir} does not build a model with this version of seqmix: {e}"
        ) from e
    if mesh_config is None:
        mesh_config = ml_collections.ConfigDict({"data": 1, "fsdp": 1})
    elif not isinstance(mesh_config, ml_collections.ConfigDict):
        mesh_config = ml_collections.ConfigDict(dict(mesh_config))
    mesh = sharding_lib.make_mesh(mesh_config)
    param_sh = sharding_lib.state_shardings(parts.params, mesh)
    rng_sh = jax.tree.map(lambda _: sharding_lib.replicated(mesh), parts.rngs)
    other_sh = sharding_lib.state_shardings(parts.other, mesh)
    directory = os.path.join(workdir, CHECKPOINT_DIR)
    steps = workdir_lib.checkpoint_steps(workdir)
    if not steps:
        every = config.train.get("checkpoint_every", None)
        raise FileNotFoundError(
            f"{workdir} has no checkpoint yet ({directory} holds no finished step): the run "
            f"saves one every train.checkpoint_every={every} steps, at its end and when "
            "stopped by SIGTERM"
        )
    checkpoints = checkpoint_lib.Checkpoints(directory, read_only=True, async_save=False)
    try:
        targets = {"params": sharding_lib.abstract_with(parts.params, param_sh)}
        found, items = checkpoints.restore_latest(targets, step=step)
        if found is None:
            raise FileNotFoundError(f"no checkpoint in {directory}")
        other_target = {"other": sharding_lib.abstract_with(parts.other, other_sh)}
        other = checkpoints.restore_part(found, "train", other_target)["other"]
    finally:
        checkpoints.close()
    rngs = steps_lib.init_model_state(
        model_config, seed, (param_sh, rng_sh, other_sh), on_host=True
    )[1]
    model = nnx.merge(parts.graphdef_eval, items["params"], rngs, other)
    logging.info("restored %s at step %d", workdir, found)
    return model, config
