"""The loop end to end: configs, outputs in the workdir, restore_model, best checkpoint,
config errors before compiling, the optimizer's schedule and decay mask, the absl launcher."""

from __future__ import annotations

import importlib.util
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from train_helpers import tiny_config

from seqmix import data as data_lib
from seqmix.configs.loader import stock_names
from seqmix.models import MIXERS, build_model, model_config
from seqmix.train import (
    apply_model,
    load_config,
    losses,
    optimizer,
    read_metrics,
    restore_model,
    split_model,
    train_and_evaluate,
)
from seqmix.train import validate as validate_config

REPO = pathlib.Path(__file__).parents[2]
CONFIGS = [REPO / "seqmix" / "configs" / f"{name}.py" for name in stock_names("train")]


def load_config_file(path: pathlib.Path, arg: str | None = None):
    spec = importlib.util.spec_from_file_location(f"cfg_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, (module.get_config(arg) if arg is not None else module.get_config())


def _names(model):
    from seqmix.models import layer_names

    return layer_names(model)


SHRINK_DATA = {
    "mqar": dict(seq_len=32, num_kv_pairs=4),
    "copying": dict(seq_len=24, num_tokens=4),
    "listops": dict(seq_len=60, max_length=60, min_length=10, max_depth=4, max_args=4),
    "bytes": dict(seq_len=32),
}


def test_config_files_exist_and_document_their_command():
    assert {p.stem for p in CONFIGS} >= {"mqar", "lm_bytes", "listops", "copying", "recall"}
    for path in CONFIGS:
        module, _ = load_config_file(path)
        assert f"seqmix-train --config={path.stem}" in module.__doc__, path.stem
    assert stock_names("distill") == ["distill"]
    module, _ = load_config_file(REPO / "seqmix" / "configs" / "distill.py")
    assert "python -m seqmix.experiments.distill --config=distill" in module.__doc__


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_config_builds_and_trains_a_few_steps(path, tmp_path):
    _, config = load_config_file(path)
    config.model.d_model = 32
    # One layer per distinct mixer of the config (compiling stays cheap; the kinds stay).
    config.model.layers = list(dict.fromkeys(_names(config.model)))
    config.data.update(SHRINK_DATA[config.data.task])
    if config.data.task == "bytes":
        config.data.data_dir = str(tmp_path / "data")
    config.data.num_eval_batches = 1
    config.train.update(
        dict(num_steps=2, batch_size=4, eval_every=0, checkpoint_every=0, log_every=1)
    )
    config.optimizer.warmup_steps = 1
    result = train_and_evaluate(config, str(tmp_path / "run"))
    assert result["step"] == 2 and np.isfinite(result["eval"]["loss"])
    assert result["metric"] in result["eval"]
    assert os.listdir(tmp_path / "run" / "checkpoints") == ["2"]


@pytest.mark.parametrize("mixer", sorted(MIXERS))
def test_mqar_variant_for_every_mixer(mixer):
    _, config = load_config_file(
        REPO / "seqmix" / "configs" / "mqar.py", f"mixer={mixer},d_model=32"
    )
    assert list(config.model.layers) == [mixer, mixer]
    parts = split_model(config.model, 0)  # abstract build: nothing compiled
    assert jax.tree.leaves(parts.params)
    validate_config(config, task=data_lib.make_task(config), num_devices=1)


def test_loss_at_positions_equals_the_masked_full_loss():
    """MQAR batches carry ``positions``: the step computes logits there only; its sums and
    gradients must equal the full-sequence masked loss."""
    _, config = load_config_file(
        REPO / "seqmix" / "configs" / "mqar.py", "mixer=attention,d_model=32,batch_size=8"
    )
    task = data_lib.make_task(config)
    batch = {k: jnp.asarray(v) for k, v in task.train_batch(0).items()}
    assert batch["positions"].shape == (batch["inputs"].shape[0], config.data.num_kv_pairs)
    model = build_model(config.model, rngs=nnx.Rngs(0))
    full = {k: v for k, v in batch.items() if k != "positions"}

    def sums(model, b):
        return losses.batch_sums("causal_lm", apply_model(model, b), b)

    def sums_and_grads(model, b):
        return sums(model, b), nnx.grad(lambda m: sums(m, b)["loss_sum"])(model)

    # one program for both batches, jitted as the training step is
    (a, grad_a), (f, grad_f) = nnx.jit(
        lambda m, b, full: (sums_and_grads(m, b), sums_and_grads(m, full))
    )(model, batch, full)
    logits = jax.eval_shape(lambda: apply_model(model, batch))
    assert logits.shape[1] == config.data.num_kv_pairs
    for key in ("loss_sum", "correct", "count"):
        np.testing.assert_allclose(a[key], f[key], rtol=1e-5)
    assert float(a["count"]) == batch["inputs"].shape[0] * config.data.num_kv_pairs
    for x, y in zip(jax.tree.leaves(nnx.state(grad_a)), jax.tree.leaves(nnx.state(grad_f))):
        np.testing.assert_allclose(x, y, rtol=2e-4, atol=1e-6)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("run"))
    config = tiny_config(num_steps=8, eval_every=4, checkpoint_every=2, keep=1)
    result = train_and_evaluate(config, workdir)
    return workdir, config, result


def test_workdir_has_config_metrics_tensorboard_and_checkpoints(finished_run):
    workdir, config, result = finished_run
    saved = load_config(workdir)
    assert saved.train.num_steps == 8 and list(saved.model.layers) == ["attention"]
    assert saved.data.to_dict() == config.data.to_dict()
    train = read_metrics(workdir, "train")
    assert [r["step"] for r in train] == list(range(1, 9))
    assert all({"loss", "accuracy", "grad_norm", "lr"} <= r.keys() for r in train)
    # Step 1 compiles: its record says how long that took and has no throughput; the others
    # report tokens/s and ms per step of training alone.
    assert train[0]["compile_seconds"] > 0 and "tokens_per_second" not in train[0]
    for r in train[1:]:
        assert r["tokens_per_second"] > 0 and r["ms_per_step"] > 0 and "compile_seconds" not in r
    evals = read_metrics(workdir, "eval")
    assert [r["step"] for r in evals] == [4, 8]
    assert result["eval"]["accuracy"] == pytest.approx(evals[-1]["accuracy"])
    events = os.listdir(os.path.join(workdir, "tensorboard"))
    assert any(e.startswith("events.out.tfevents") for e in events)


def _kept(workdir):
    return sorted(int(p) for p in os.listdir(os.path.join(workdir, "checkpoints")))


def test_keeps_the_last_and_the_best_checkpoint(finished_run, tmp_path):
    workdir, config, _ = finished_run
    # Saved: 2, 6 (no evaluation) and 4, 8 (evaluated); keep=1 keeps 8 and the best of 4, 8.
    accuracy = {r["step"]: r["accuracy"] for r in read_metrics(workdir, "eval")}
    kept = _kept(workdir)
    assert 8 in kept and len(kept) <= 2 and not {2, 6} & set(kept)
    assert max(accuracy[s] for s in kept) == max(accuracy.values())
    # Resumed (metrics of old checkpoints now read from disk), two more steps.
    copy = str(tmp_path / "copy")
    shutil.copytree(workdir, copy)
    config = tiny_config(num_steps=10, eval_every=4, checkpoint_every=2, keep=1)
    train_and_evaluate(config, copy)
    accuracy = {r["step"]: r["accuracy"] for r in read_metrics(copy, "eval")}
    kept = _kept(copy)
    assert 10 in kept and len(kept) <= 2
    assert max(accuracy[s] for s in kept) == max(accuracy[s] for s in (4, 8, 10))


def test_restore_model_reproduces_the_final_evaluation(finished_run):
    workdir, config, result = finished_run
    model, restored_config = restore_model(workdir)
    assert restored_config.train.num_steps == 8
    task = data_lib.make_task(config)
    correct = count = 0.0
    for batch in task.eval_batches():
        logits = model(jnp.asarray(batch["inputs"]))
        hit = (np.asarray(jnp.argmax(logits, -1)) == batch["targets"]) * batch["mask"]
        correct, count = correct + hit.sum(), count + batch["mask"].sum()
    assert correct / count == pytest.approx(result["eval"]["accuracy"])


def _expect_error(config, match, tmp_path):
    workdir = tmp_path / "never"
    with pytest.raises(ValueError, match=match):
        train_and_evaluate(config, str(workdir))
    assert not workdir.exists()  # stopped before writing (or compiling) anything


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda c: setattr(c.model, "layers", ["attention", "nope"]), r"model.layers.*'nope'"),
        (lambda c: setattr(c.train, "num_steps", -5), r"train.num_steps"),
        (lambda c: setattr(c.train, "batch_size", 0), r"train.batch_size"),
        (lambda c: setattr(c.mesh, "data", 2), r"mesh.data x mesh.fsdp"),
        (lambda c: setattr(c.optimizer, "lr", -1.0), r"optimizer.lr"),
        (lambda c: setattr(c.optimizer, "schedule", "step"), r"optimizer.schedule"),
        (lambda c: setattr(c.optimizer, "warmup_steps", 100), r"optimizer.warmup_steps"),
        (lambda c: setattr(c.data, "num_kv_pairs", 50), r"data.num_kv_pairs"),
        (lambda c: setattr(c.data, "task", "nope"), r"data.task"),
        (lambda c: setattr(c.model, "vocab_size", 8), r"model.vocab_size"),
        (lambda c: setattr(c.model, "kind", "classifier"), r"model.kind"),
        (lambda c: setattr(c.train, "compute_dtype", "int8"), r"train.compute_dtype"),
        (lambda c: setattr(c.model.mixers.attention, "num_heads", 3), r"model: .*num_heads"),
        (lambda c: setattr(c.train, "data_processes", -1), r"train.data_processes"),
    ],
    ids=[
        "mixer",
        "steps",
        "batch",
        "mesh",
        "lr",
        "schedule",
        "warmup",
        "kv_pairs",
        "task",
        "vocab",
        "kind",
        "dtype",
        "heads",
        "data_processes",
    ],
)
def test_config_errors_name_the_key_before_compiling(change, match, tmp_path):
    config = tiny_config()
    change(config)
    _expect_error(config, match, tmp_path)


def test_batch_not_divisible_by_the_data_parallel_devices():
    config = tiny_config(batch_size=12)
    with pytest.raises(ValueError, match=r"train.batch_size=12 .* 8 data-parallel devices"):
        validate_config(config, num_devices=8)
    validate_config(tiny_config(batch_size=16), num_devices=8)


def test_schedule_warms_up_then_decays_to_zero():
    for kind in ("cosine", "linear"):
        opt = ml_collections.ConfigDict(dict(lr=1.0, warmup_steps=10, schedule=kind))
        s = optimizer.learning_rate_schedule(opt, 110)
        assert float(s(0)) == 0.0 and float(s(5)) == pytest.approx(0.5)
        assert float(s(10)) == pytest.approx(1.0)
        assert float(s(60)) == pytest.approx(0.5, abs=1e-6)  # both are 1/2 half-way
        assert float(s(110)) == pytest.approx(0.0, abs=1e-7)
    cos = optimizer.learning_rate_schedule(
        ml_collections.ConfigDict(dict(lr=1.0, warmup_steps=10, schedule="cosine")), 110
    )
    assert float(cos(35)) == pytest.approx(0.5 * (1 + np.cos(np.pi * 0.25)))


def test_weight_decay_skips_norms_biases_and_vectors():
    config = model_config(
        vocab_size=16,
        d_model=16,
        layers=["mamba2", "attention"],
        mixers={"mamba2": {"headdim": 8, "d_state": 8}},
    )
    model = nnx.eval_shape(lambda: build_model(config, rngs=nnx.Rngs(0)))
    params = nnx.state(model, nnx.Param)
    mask = {
        "/".join(map(str, p)): v.get_value()
        for p, v in nnx.to_flat_state(optimizer.decay_mask(params))
    }
    shapes = {"/".join(map(str, p)): v.get_value().shape for p, v in nnx.to_flat_state(params)}
    assert mask["backbone/embed/embedding"]
    for name, decayed in mask.items():
        if "norm" in name or "bias" in name or len(shapes[name]) < 2:
            assert not decayed, name
    assert any("A_log" in n for n in mask) and not any(mask[n] for n in mask if "A_log" in n)
    assert sum(mask.values()) >= 6


def test_launcher_runs_from_any_directory_with_a_stock_config_by_name(tmp_path, monkeypatch):
    """Run where the checkout is not: the config by name, overrides of any key (the hybrid
    pattern included), the default workdir under $SEQMIX_RUNS, the log's compile window,
    ms/step and parameters per layer."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = dict(os.environ, JAX_PLATFORMS="cpu", SEQMIX_RUNS=str(tmp_path / "runs"))
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [
        sys.executable,
        "-m",
        "seqmix.experiments.train",
        "--config=mqar:mixer=attention",
        "--config.model.d_model=16",
        "--config.model.layers=MA",
        "--config.model.mixers.mamba2.headdim=8",
        "--config.model.mixers.mamba2.d_state=8",
        "--config.data.seq_len=32",
        "--config.data.num_kv_pairs=4",
        "--config.train.num_steps=3",
        "--config.train.batch_size=4",
        "--config.optimizer.warmup_steps=1",
        "--config.data.num_eval_batches=1",
    ]
    proc = subprocess.run(cmd, cwd=elsewhere, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "FINAL eval at step 3: accuracy = " in proc.stdout
    workdir = tmp_path / "runs" / "mqar-mixer=attention"
    saved = load_config(str(workdir))
    assert saved.model.d_model == 16 and list(saved.model.layers) == ["mamba2", "attention"]
    assert list(elsewhere.iterdir()) == []  # nothing written where the command ran
    log = proc.stderr
    assert "step 1 (compile and run) took" in log and "ms/step" in log
    assert "layer 0 (mamba2) mixer" in log and "layer 1 (attention) mixer" in log
    from seqmix.experiments.train import default_workdir

    monkeypatch.setenv("SEQMIX_RUNS", "/somewhere")
    assert default_workdir("mqar") == os.path.join("/somewhere", "mqar")
    assert default_workdir("seqmix/configs/mqar.py:mixer=gla") == os.path.join(
        "/somewhere", "mqar-mixer=gla"
    )
    monkeypatch.delenv("SEQMIX_RUNS")
    assert default_workdir("lm_bytes") == os.path.join(
        os.path.expanduser("~"), "seqmix-runs", "lm_bytes"
    )


def test_launcher_help_states_the_default_workdir():
    proc = subprocess.run(
        [sys.executable, "-m", "seqmix.experiments.train", "--helpshort"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    text = proc.stdout + proc.stderr
    assert "~/seqmix-runs/<config name>" in text and "$SEQMIX_RUNS" in text
    assert "lm_bytes" in text and "--config.model.layers=GGGA" in text


def test_bfloat16_compute_keeps_float32_parameters(tmp_path):
    config = tiny_config(num_steps=3, checkpoint_every=0, compute_dtype="bfloat16")
    result = train_and_evaluate(config, str(tmp_path))
    assert np.isfinite(result["eval"]["loss"])
    model, saved = restore_model(str(tmp_path))
    assert saved.train.compute_dtype == "bfloat16"
    assert {x.dtype for x in jax.tree.leaves(nnx.state(model, nnx.Param))} == {np.dtype("float32")}
    assert model.backbone.embed.dtype == "bfloat16"  # the compute dtype reached the layers


def test_recall_configs_train_in_bfloat16_with_float32_state_reproducibly(tmp_path):
    """The study's mixed precision: bf16 compute, float32 parameters and optimizer state,
    and two runs from the same seed end bit-identical, the second with its batches made
    in two spawned processes (``train.data_processes``) instead of a thread."""
    from train_helpers import assert_identical, checkpoint_arrays

    from seqmix.configs import loader

    config = loader.load("recall:mixer=gla,d_model=32,seq_len=32,num_kv_pairs=4,steps=3")
    loader.apply_overrides(
        config,
        [
            "model.vocab_size=64",
            "data.vocab_size=64",
            "train.batch_size=4",
            "data.num_eval_batches=1",
        ],
    )
    assert config.train.compute_dtype == "bfloat16"
    for name, processes in (("a", 0), ("b", 2)):
        config.train.data_processes = processes
        result = train_and_evaluate(config, str(tmp_path / name))
        assert result["step"] == 3 and np.isfinite(result["eval"]["loss"])
    a, b = (checkpoint_arrays(str(tmp_path / n), 3) for n in ("a", "b"))
    assert {x.dtype for k, x in a.items() if "count" not in k} == {np.dtype("float32")}
    assert any("/mu/" in k or "mu" in k.split("/") for k in a)  # Adam's moments are there
    assert_identical(a, b)


def test_batch_processes_make_the_tasks_batches_in_other_processes():
    """``train.data_processes`` > 0: spawned processes make the same batches as the task
    itself does here."""
    import concurrent.futures
    import os
    import signal
    import time

    import train_helpers

    from seqmix import data
    from seqmix.train.loop import batch_prefetcher

    task = data.make_task(tiny_config())
    with batch_prefetcher(1) as pool:  # SIGINT (sent to a whole process group) spares it
        child = pool.submit(os.getpid).result()
        os.kill(child, signal.SIGINT)
        time.sleep(0.5)
        assert pool.submit(os.getpid).result() == child
    with batch_prefetcher(2) as pool:
        assert isinstance(pool, concurrent.futures.ProcessPoolExecutor)
        assert pool.submit(os.getpid).result() != os.getpid()
        made = pool.submit(task.train_batch, 7).result()
        # making batches started no backend there (and one would be the CPU's)
        assert pool.submit(train_helpers.jax_backends_started).result() == (False, "cpu")
    here = task.train_batch(7)
    assert made.keys() == here.keys()
    for k in here:
        np.testing.assert_array_equal(made[k], here[k], err_msg=k)
    with batch_prefetcher(0) as pool:
        assert isinstance(pool, concurrent.futures.ThreadPoolExecutor)
