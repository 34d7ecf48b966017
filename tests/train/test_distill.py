"""Distillation in the training loop: attention transfer trains only the new mixers and
lowers their alignment error, end to end lowers the KL, a stopped run resumes bit for bit,
mismatched pairs are refused, and the launcher runs from a seqmix teacher run."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx
from train_helpers import assert_identical, checkpoint_arrays, tiny_config

from seqmix import data as data_lib
from seqmix.configs import loader
from seqmix.models import build_model, model_config, save_pretrained
from seqmix.models.layerwise import forward_with, logit_kl
from seqmix.train import distill, init_state, read_metrics, restore_model, train_and_evaluate
from seqmix.train import workdir as workdir_lib
from seqmix.train.optimizer import _path_names

REPO = pathlib.Path(__file__).parents[2]
VOCAB, D_MODEL = 16, 16


def teacher_model_config(vocab=VOCAB, d_model=D_MODEL):
    return model_config(
        kind="causal_lm",
        vocab_size=vocab,
        d_model=d_model,
        layers="AAA",
        mlp={"type": "swiglu", "expansion": 2.0},
        mixers={"attention": {"num_heads": 2}},
    )


@pytest.fixture(scope="module")
def teacher():
    cfg = teacher_model_config()
    model = build_model(cfg, rngs=nnx.Rngs(3))
    model.eval()
    return distill.Teacher(model, cfg, "", "memory")


def distill_config(stages: str, *, mixer="gla", lr=3e-3, **distill_keys):
    config = tiny_config(checkpoint_every=0)
    config.model = ml_collections.ConfigDict()
    config.train.num_steps = None
    config.optimizer.update(dict(lr=lr, warmup_steps=0, schedule="constant"))
    config.distill = distill.defaults()
    config.distill.mixer = mixer
    config.distill.stages = stages
    config.distill.update(distill_keys)
    return config


def run_steps(config, teacher, *, fixed_batch=True):
    """Trains every step of ``config``'s stages through the program's own step; returns
    (initial params, final params, per-step metrics)."""
    config, student = distill.prepare(config, teacher)
    program = distill.build_distill_program(config, teacher, student=student)
    state, rngs = init_state(program)
    before = jax.tree.map(np.array, state.params)
    task = data_lib.make_task(config)
    history = []
    for step in range(1, program.num_steps + 1):
        batch = program.put_batch(task.train_batch(1 if fixed_batch else step))
        state, metrics = program.train_step(state, rngs, batch, np.int32(step))
        history.append(jax.device_get(metrics))
    return before, jax.tree.map(np.array, state.params), history


def flat(params) -> dict[str, np.ndarray]:
    out = {}
    jax.tree_util.tree_map_with_path(
        lambda p, x: out.__setitem__("/".join(_path_names(p)), np.asarray(x)), params
    )
    return out


def test_stages_parse_and_bad_stages_are_refused():
    stages = distill.parse_stages("transfer:3:4; e2e:2+3:5", offset=10)
    assert [(s.kind, s.layers, s.first, s.last) for s in stages] == [
        ("transfer", (3,), 11, 14),
        ("e2e", (2, 3), 15, 19),
    ]
    for bad, match in [
        ("", "distill.stages"),
        ("align:1:3", "kind 'align'"),
        ("transfer:1:0", "steps >= 1"),
        ("transfer:1+1:3", "distinct"),
        ("transfer:a:3", "integer layers"),
        ("transfer:1", "<kind>:<layers>:<steps>"),
    ]:
        with pytest.raises(ValueError, match=match):
            distill.parse_stages(bad)


def test_attention_transfer_lowers_the_alignment_error_and_trains_only_the_mixers(teacher):
    before, after, history = run_steps(distill_config("transfer:1+2:8"), teacher)
    for i in (1, 2):
        first, last = history[0][f"align_layer{i}"], history[-1][f"align_layer{i}"]
        assert last < 0.7 * first, (i, first, last)
    assert all(m["stage"] == 0 and "kl" not in m for m in history)
    b, a = flat(before), flat(after)
    changed = {k for k in b if not np.array_equal(b[k].view(np.uint8), a[k].view(np.uint8))}
    new = {k for k in b if k.startswith(("backbone/layers/1/mixer", "backbone/layers/2/mixer"))}
    assert new and changed == new, sorted(changed ^ new)


def test_end_to_end_lowers_the_kl_and_trains_mlps_by_config(teacher):
    config = distill_config("e2e:1+2:8", temperature=1.0, ce_weight=0.5, train_mlps=True)
    before, after, history = run_steps(config, teacher)
    assert history[-1]["kl"] < 0.7 * history[0]["kl"], [m["kl"] for m in history]
    assert all(np.isfinite(m["cross_entropy"]) for m in history)
    b, a = flat(before), flat(after)
    changed = {k for k in b if not np.array_equal(b[k], a[k])}
    assert any("/mlp/" in k for k in changed) and any("/1/mixer/" in k for k in changed)
    assert not any(k.startswith(("backbone/embed", "backbone/layers/0/mixer")) for k in changed)
    assert not any("norm" in k for k in changed)


def test_a_progressive_stage_keeps_the_teacher_attention_in_the_layers_not_yet_replaced(
    teacher,
):
    """In ``e2e:2`` layer 1 (replaced only in the next stage) is still the teacher's
    attention: the stage's evaluation KL is that of the teacher with layer 2 alone
    replaced, and layer 1's converted mixer does not move until its stage."""
    config, student = distill.prepare(distill_config("e2e:2:2;transfer:1+2:2"), teacher)
    program = distill.build_distill_program(config, teacher, student=student)
    state, rngs = init_state(program)
    batch = data_lib.make_task(config).eval_batches()[0]
    sums = program.eval_step_for(1)(state.params, rngs, state.other, program.put_batch(batch))
    mixer2 = student.model.backbone.layers[2].mixer
    kl = nnx.jit(lambda t, m, x, mask: logit_kl(t(x), forward_with(t, x, {2: m}), mask=mask))
    want = kl(teacher.model, mixer2, batch["inputs"], batch["mask"])
    np.testing.assert_allclose(sums["kl_sum"] / sums["count"], want, rtol=1e-5)
    assert int(sums["stage_sum"]) == 0 and "align_layer1_sum" not in sums

    before = flat(state.params)
    task = data_lib.make_task(config)
    seen = []
    for step in range(1, 5):
        state, metrics = program.train_step(
            state, rngs, program.put_batch(task.train_batch(step)), np.int32(step)
        )
        params = flat(state.params)
        moved1 = any(
            not np.array_equal(before[k], params[k])
            for k in before
            if k.startswith("backbone/layers/1/mixer")
        )
        seen.append((int(metrics["stage"]), moved1))
    assert seen == [(0, False), (0, False), (1, True), (1, True)]
    mlps = [k for k in before if "/mlp/" in k]  # distill.train_mlps is off by default
    assert mlps and all(np.array_equal(before[k], params[k]) for k in mlps)


def test_stopped_and_resumed_run_is_bit_identical(teacher, tmp_path):
    config, student = distill.prepare(
        distill_config("transfer:1+2:4;e2e:1+2:4", temperature=2.0, ce_weight=0.1), teacher
    )
    programs = {}

    def build(config, *, mesh=None, step_offset=0):
        # One program for the three runs: the same compiled steps (fewer compilations)
        if step_offset not in programs:
            programs[step_offset] = distill.build_distill_program(
                config, teacher, student=student, mesh=mesh, step_offset=step_offset
            )
        return programs[step_offset]

    straight = str(tmp_path / "straight")
    train_and_evaluate(config, straight, program_builder=build)
    resumed = str(tmp_path / "resumed")

    def stop_at_five(step, metrics):
        del metrics
        return "stop" if step == 5 else None

    first = train_and_evaluate(config, resumed, program_builder=build, callbacks=[stop_at_five])
    assert first["stopped_by"] == "stop" and first["step"] < 8
    second = train_and_evaluate(config, resumed, program_builder=build)
    assert second["event"] == "resume" and second["step"] == 8
    assert_identical(checkpoint_arrays(straight, 8), checkpoint_arrays(resumed, 8))
    lines = read_metrics(resumed)
    evals = [m for m in lines if m["split"] == "eval"]
    assert {"kl", "align_layer1", "align_layer2", "stage", "loss"} <= set(evals[-1])
    assert {m["stage"] for m in lines if m["split"] == "train"} == {0.0, 1.0}


def test_mismatched_teacher_and_student_are_refused(teacher):
    for key, value, match in [
        ("vocab_size", 32, "vocabularies differ"),
        ("d_model", 32, "widths differ"),
    ]:
        config = distill_config("transfer:1:2")
        config.model = teacher_model_config(**{"vocab" if key == "vocab_size" else key: value})
        config.model.layers = ["attention", "gla", "attention"]
        with pytest.raises(ValueError, match=match):
            distill.prepare(config, teacher)
        config.train.num_steps = 2
        with pytest.raises(ValueError, match=match):
            distill.build_distill_program(config, teacher)
    config = distill_config("transfer:1:2")
    config.train.num_steps = 5
    with pytest.raises(ValueError, match=r"train\.num_steps=5 but distill\.stages add up to 2"):
        distill.prepare(config, teacher)
    with pytest.raises(ValueError, match="program_builder"):
        train_and_evaluate(distill.prepare(distill_config("transfer:1:2"), teacher)[0], "/nope")


def test_teacher_from_a_hugging_face_directory(tmp_path, teacher):
    save_pretrained(teacher.model, teacher.config, tmp_path / "hf")
    loaded = distill.load_teacher(str(tmp_path / "hf"))
    assert loaded.format == "hf"
    tokens = np.arange(12).reshape(2, 6) % VOCAB
    np.testing.assert_array_equal(
        np.asarray(loaded.model(tokens)), np.asarray(teacher.model(tokens))
    )
    with pytest.raises(ValueError, match="neither a seqmix run directory"):
        distill.load_teacher(str(tmp_path))
    with pytest.raises(ValueError, match=r"distill\.teacher is empty"):
        distill.load_teacher("")


def test_launcher_distils_a_seqmix_teacher_run_end_to_end(tmp_path):
    data_dir = str(tmp_path / "data")
    teacher_config = ml_collections.ConfigDict(tiny_config(num_steps=2, checkpoint_every=0))
    teacher_config.model = model_config(
        kind="causal_lm",
        vocab_size=256,
        d_model=D_MODEL,
        layers="AA",
        mlp=None,
        mixers={"attention": {"num_heads": 2}},
    )
    teacher_config.data = ml_collections.ConfigDict(
        dict(task="bytes", seq_len=32, data_dir=data_dir, val_fraction=0.05, num_eval_batches=1)
    )
    teacher_dir = str(tmp_path / "teacher")
    train_and_evaluate(teacher_config, teacher_dir)
    workdir = str(tmp_path / "student")
    command = [
        sys.executable,
        "-m",
        "seqmix.experiments.distill",
        "--config=distill:mixer=mamba2,layers=1,transfer_steps=2,e2e_steps=2,seq_len=32,"
        "batch_size=4",
        f"--config.distill.teacher={teacher_dir}",
        f"--config.data.data_dir={data_dir}",
        "--config.data.num_eval_batches=1",
        "--config.optimizer.warmup_steps=1",
        "--config.train.eval_every=2",
        "--config.train.checkpoint_every=2",
        "--config.train.log_every=1",
        f"--workdir={workdir}",
    ]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        command, capture_output=True, text=True, timeout=240, env=env, cwd=str(tmp_path)
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "FINAL eval at step 4" in proc.stdout
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
    lines = read_metrics(workdir)
    evals = {m["step"]: m for m in lines if m["split"] == "eval"}
    assert evals[2]["stage"] == 0 and evals[4]["stage"] == 1
    assert {"bits_per_byte", "kl", "align_layer1"} <= set(evals[4])
    train = [m for m in lines if m["split"] == "train"]
    assert "align_layer1" in train[0] and "bits_per_byte" not in train[0]
    assert "kl" in train[-1] and "bits_per_byte" in train[-1]
    with open(os.path.join(workdir, "config.json")) as f:
        recorded = json.load(f)
    assert recorded["model"]["layers"] == ["attention", "mamba2"]
    student, _ = restore_model(workdir)  # the distilled student reads back like any run
    assert student.layer_names == ("attention", "mamba2")
    # The same command again rebuilds the same config: the run there resumes
    again = loader.apply_overrides(
        loader.load(command[3].split("=", 1)[1]),
        [tuple(a[len("--config.") :].split("=", 1)) for a in command if a.startswith("--config.")],
    )
    again, _ = distill.prepare(again, distill.load_teacher(teacher_dir))
    assert workdir_lib.plan_start(again, workdir).event == "resume"
