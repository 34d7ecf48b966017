"""Configs by name or path, and ``--config.<key>=<value>`` overrides of every key: typed,
the hybrid pattern included, errors naming the key."""

from __future__ import annotations

import pytest

from seqmix.configs import loader


def test_stock_configs_load_by_name_with_a_variant():
    assert set(loader.stock_names()) >= {"mqar", "copying", "listops", "lm_bytes", "recall"}
    config = loader.load("mqar:mixer=gla,d_model=32")
    assert list(config.model.layers) == ["gla", "gla"] and config.model.d_model == 32


def test_a_config_file_loads_by_path(tmp_path):
    path = tmp_path / "mine.py"
    path.write_text(
        "from seqmix.configs import mqar\n"
        "def get_config(arg=None):\n"
        "    c = mqar.get_config()\n"
        "    c.model.d_model = int(arg or 48)\n"
        "    return c\n"
    )
    assert loader.load(str(path)).model.d_model == 48
    assert loader.load(f"{path}:40").model.d_model == 40
    assert loader.config_name(f"{path}:40") == "mine-40"


@pytest.mark.parametrize(
    "spec, match",
    [
        ("mqr", r"'mqar'.*stock configs: .*lm_bytes"),
        ("nowhere/x.py", r"no such file"),
        ("mqar:nope=1", r"unknown config argument 'nope'"),
    ],
)
def test_bad_specs_say_what_exists(spec, match):
    with pytest.raises(ValueError, match=match):
        loader.load(spec)


def test_overrides_take_the_type_of_the_value_they_replace():
    config = loader.load("mqar")
    loader.apply_overrides(
        config,
        [
            "model.d_model=128",
            "optimizer.lr=1e-3",
            "train.async_checkpoints=false",
            "data.task=mqar",
            "train.compute_dtype=bfloat16",  # a typed placeholder (None by default)
            "train.eval_batch_size=32",
            "model.mixers.attention.num_heads=4",
            "model.implementation=xla",  # None without a type: JSON or a string
            "model.mlp.expansion=3",
        ],
    )
    assert config.model.d_model == 128 and isinstance(config.model.d_model, int)
    assert config.optimizer.lr == 1e-3
    assert config.train.async_checkpoints is False
    assert config.train.compute_dtype == "bfloat16" and config.train.eval_batch_size == 32
    assert config.model.mixers.attention.num_heads == 4
    assert config.model.implementation == "xla"
    assert config.model.mlp.expansion == 3.0 and isinstance(config.model.mlp.expansion, float)


@pytest.mark.parametrize(
    "value, layers",
    [
        ("GGGA", ["gla", "gla", "gla", "attention"]),
        ("MMMA", ["mamba2", "mamba2", "mamba2", "attention"]),
        ("gla,attention", ["gla", "attention"]),
        ("based", ["based"]),
        ('["retnet", "mamba"]', ["retnet", "mamba"]),
    ],
)
def test_the_hybrid_pattern_is_overridable(value, layers):
    config = loader.apply_overrides(loader.load("lm_bytes"), [("model.layers", value)])
    assert list(config.model.layers) == layers


@pytest.mark.parametrize(
    "item, match",
    [
        ("model.d_model=1.5", r"--config.model.d_model='1.5': expected an integer"),
        ("model.d_model=big", r"--config.model.d_model='big': expected an integer"),
        ("optimizer.lr=fast", r"--config.optimizer.lr='fast': expected a number"),
        ("train.async_checkpoints=maybe", r"async_checkpoints='maybe': expected true or false"),
        ("model.dmodel=64", r"model has no key 'dmodel' \(did you mean model.d_model\?\)"),
        ("trian.num_steps=3", r"the config has no key 'trian' \(did you mean train\?\)"),
        ("model.layers=GXA", r"--config.model.layers='GXA': .*letter 'X'"),
        ("model.layers=gla,nope", r"--config.model.layers='gla,nope': .*unknown mixer 'nope'"),
        ("model.mlp=3", r"--config.model.mlp is a group of keys"),
        ("model.d_model.x=3", r"model.d_model is a value"),
        ("train.eval_batch_size=1.5", r"eval_batch_size='1.5': expected an integer"),
    ],
)
def test_a_bad_override_names_the_key_and_what_was_expected(item, match):
    with pytest.raises(ValueError, match=match):
        loader.apply_overrides(loader.load("mqar"), [item])


def test_the_workdir_name_follows_the_spec(monkeypatch, tmp_path):
    monkeypatch.setenv("SEQMIX_RUNS", str(tmp_path))
    assert loader.default_workdir("mqar:mixer=gla,d_model=32") == str(
        tmp_path / "mqar-mixer=gla-d_model=32"
    )
    assert loader.default_workdir("some/dir/exp.py") == str(tmp_path / "exp")
