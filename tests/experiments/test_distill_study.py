"""The distillation study's runs train and evaluate on the same batches: the teacher, the
distilled students and the hybrid from scratch differ only in their model and objective."""

import pytest

from seqmix.experiments import distill_study as ds

SMALL = ds.Settings(teacher_steps=30, transfer_steps=5, e2e_steps=15, seq_len=64, batch_size=4)


def test_every_run_sees_the_same_data():
    teacher = ds.teacher_config(SMALL)
    assert list(teacher.model.layers) == ["attention"] * 4
    assert teacher.train.num_steps == 30 and teacher.optimizer.warmup_steps <= 3
    for init in ("attention", "random"):
        config = ds.distill_config(SMALL, "gla", init)
        ds.same_data(config, teacher)
        assert config.distill.init == init and config.distill.mixer == "gla"
        assert config.distill.stages == "transfer:1+2+3:5;e2e:1+2+3:15"


def test_the_scratch_run_is_the_student_for_as_many_steps():
    student = ds.teacher_config(SMALL).model
    student.layers = ["attention", "gla", "gla", "gla"]
    config = ds.scratch_config(SMALL, student)
    ds.same_data(config, ds.teacher_config(SMALL))
    assert list(config.model.layers) == ["attention", "gla", "gla", "gla"]
    assert config.train.num_steps == SMALL.transfer_steps + SMALL.e2e_steps


def test_runs_on_other_batches_are_refused():
    other = ds.Settings(seq_len=32, batch_size=4)
    with pytest.raises(ValueError, match="seq_len"):
        ds.same_data(ds.distill_config(other, "gla", "attention"), ds.teacher_config(SMALL))
