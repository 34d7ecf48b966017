"""Several devices: a data x fsdp mesh gives the loss of one device; checkpoints restore onto
any mesh. The 8 devices are CPU devices of a subprocess (XLA_FLAGS)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import typing

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from seqmix.train import restore_model, sharding

HERE = pathlib.Path(__file__).parent


@pytest.fixture(scope="module")
def mesh_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("mesh"))
    # 8 CPU devices, with the suite's compile flags (tests/conftest.py)
    flags = f"--xla_force_host_platform_device_count=8 {os.environ.get('XLA_FLAGS', '')}"
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags.strip())
    env["PYTHONPATH"] = os.pathsep.join(
        [str(HERE.parents[1]), str(HERE), env.get("PYTHONPATH", "")]
    )
    proc = subprocess.run(
        [sys.executable, str(HERE / "mesh_runner.py"), workdir],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return workdir, json.loads(proc.stdout.split("RESULT ")[-1])


def test_loss_on_a_data_x_fsdp_mesh_matches_one_device(mesh_run):
    _, out = mesh_run
    assert len(out["loss_sharded"]) == len(out["loss_single"]) == 4
    np.testing.assert_allclose(out["loss_sharded"], out["loss_single"], rtol=2e-5)


def test_parameters_are_sharded_over_fsdp_by_logical_axes(mesh_run):
    _, out = mesh_run
    specs = out["specs_2x4"]
    # embedding [vocab, embed]: the "embed" dimension is split over fsdp.
    embedding = [v for k, v in specs.items() if k.endswith("embedding")]
    assert embedding == [str(P(None, "fsdp"))]
    assert out["devices_of_embedding_2x4"] == 8
    assert all(v.count("fsdp") <= 1 and "data" not in v for v in specs.values())
    assert sum("fsdp" in v for v in specs.values()) >= len(specs) // 2  # most are split


def test_restore_onto_other_meshes_and_resume(mesh_run):
    workdir, out = mesh_run
    assert out["sum_2x4"] == out["sum_1x1"]
    # ...and onto this process's single device.
    model, config = restore_model(os.path.join(workdir, "sharded"), step=4)
    total = sum(
        np.abs(np.asarray(x, np.float64)).sum()
        for x in jax.tree.leaves(nnx.state(model, nnx.Param))
    )
    assert total == pytest.approx(out["sum_2x4"], rel=1e-12)
    assert config.mesh.data == 8  # the resumed run's config
    assert out["resumed_to"] == 6 and len(out["resumed_losses"]) == 6


def test_spec_for_follows_rules_and_divisibility():
    devices = np.asarray(jax.devices() * 1)[:1].reshape(1, 1, 1)
    mesh = jax.sharding.Mesh(devices, sharding.AXES)
    assert sharding.spec_for(("vocab", "embed"), (16, 8), mesh) == P()  # fsdp of size 1

    class FakeMesh:  # only .shape is read
        shape: typing.ClassVar[dict] = {"data": 2, "fsdp": 4}

    m = FakeMesh()
    assert sharding.spec_for(("vocab", "embed"), (16, 8), m) == P(None, "fsdp")
    assert sharding.spec_for(("embed", "mlp"), (6, 8), m) == P(None, "fsdp")  # 6 % 4 != 0
    assert sharding.spec_for(("heads",), (3,), m) == P()  # nothing divisible: replicated
    assert sharding.spec_for(None, (4, 4), m) == P()


def test_mesh_shape_errors_name_the_key():
    with pytest.raises(ValueError, match=r"mesh.fsdp"):
        sharding.mesh_shape(ml_collections.ConfigDict({"data": -1, "fsdp": 3}), 8)
    with pytest.raises(ValueError, match=r"mesh.data"):
        sharding.mesh_shape(ml_collections.ConfigDict({"data": 0, "fsdp": 1}), 8)
    with pytest.raises(ValueError, match="16 devices"):
        sharding.mesh_shape(ml_collections.ConfigDict({"data": 8, "fsdp": 2}), 8)
    assert sharding.mesh_shape(ml_collections.ConfigDict({"data": -1, "fsdp": 2}), 8) == (4, 2)


def test_mesh_seq_axis_composes_with_data_and_fsdp():
    dims = sharding.mesh_dims
    assert dims(ml_collections.ConfigDict({"data": -1, "fsdp": 1, "seq": 4}), 8) == (2, 1, 4)
    assert dims(ml_collections.ConfigDict({"data": 1, "fsdp": -1, "seq": 2}), 8) == (1, 4, 2)
    assert dims(ml_collections.ConfigDict({"data": -1, "fsdp": 1}), 8) == (8, 1, 1)  # default
    assert sharding.AXES == ("data", "fsdp", "seq")
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match=r"mesh\.seq"):
            dims(ml_collections.ConfigDict({"data": -1, "fsdp": 1, "seq": bad}), 8)
    with pytest.raises(ValueError, match=r"mesh\.seq=3 does not divide the 8 devices"):
        dims(ml_collections.ConfigDict({"data": -1, "fsdp": 1, "seq": 3}), 8)
    with pytest.raises(ValueError, match=r"mesh\.data=4 does not divide the 2 device groups"):
        dims(ml_collections.ConfigDict({"data": 4, "fsdp": -1, "seq": 4}), 8)
    with pytest.raises(ValueError, match="16 devices"):
        dims(ml_collections.ConfigDict({"data": 2, "fsdp": 2, "seq": 4}), 8)


def test_validate_names_mesh_seq_when_it_does_not_divide_the_sequence():
    from train_helpers import tiny_config

    from seqmix import data
    from seqmix.train import config as config_lib

    config = tiny_config()  # seq_len 16
    config.mesh.seq = 3
    with pytest.raises(ValueError, match=r"mesh\.seq=3 does not divide the sequence length 16"):
        config_lib.validate(config, task=data.make_task(config), num_devices=3)
