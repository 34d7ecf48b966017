"""Run by test_mesh.py in a subprocess with 8 CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=8``):

    python tests/train/mesh_runner.py WORKDIR

Trains the tiny config on a data=4 x fsdp=2 mesh and on one device, restores the first run
onto other meshes, resumes its training on a data=8 mesh, and prints one JSON line.
"""

from __future__ import annotations

import json
import os
import sys

import jax
import numpy as np
from flax import nnx
from train_helpers import tiny_config


def _param_sum(model) -> float:
    return float(
        sum(
            np.abs(np.asarray(x, np.float64)).sum()
            for x in jax.tree.leaves(nnx.state(model, nnx.Param))
        )
    )


def _specs(model) -> dict:
    state = nnx.state(model, nnx.Param)
    return {
        "/".join(map(str, path)): str(v.get_value().sharding.spec)
        for path, v in nnx.to_flat_state(state)
    }


def main(workdir: str) -> None:
    from seqmix.train import read_metrics, restore_model, train_and_evaluate

    assert len(jax.devices()) == 8, jax.devices()
    out = {}
    for name, (data, fsdp) in {"sharded": (4, 2), "single": (1, 1)}.items():
        config = tiny_config(num_steps=4, checkpoint_every=2)
        config.mesh.data, config.mesh.fsdp = data, fsdp
        train_and_evaluate(config, os.path.join(workdir, name))
        out[f"loss_{name}"] = [
            r["loss"] for r in read_metrics(os.path.join(workdir, name), "train")
        ]
    sharded = os.path.join(workdir, "sharded")
    m24, _ = restore_model(sharded, mesh_config={"data": 2, "fsdp": 4})
    m11, _ = restore_model(sharded, mesh_config={"data": 1, "fsdp": 1})
    out["sum_2x4"], out["sum_1x1"] = _param_sum(m24), _param_sum(m11)
    out["specs_2x4"] = _specs(m24)
    out["devices_of_embedding_2x4"] = len(
        m24.backbone.embed.embedding.get_value().sharding.device_set
    )
    # Resume the data=4 x fsdp=2 run on a data=8 mesh.
    config = tiny_config(num_steps=6, checkpoint_every=2)
    config.mesh.data, config.mesh.fsdp = 8, 1
    result = train_and_evaluate(config, sharded)
    out["resumed_to"] = result["step"]
    out["resumed_losses"] = [r["loss"] for r in read_metrics(sharded, "train")]
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
