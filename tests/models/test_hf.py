"""Hugging Face checkpoints: seqmix's logits against transformers' (stored fixtures made by
scripts/make_hf_fixtures.py), the bit-exact round trip, export of seqmix models, and the
errors for what the mapping does not support."""

from __future__ import annotations

import copy
import filecmp
import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from seqmix.layers.rotary import rope_frequencies, rope_scaling_spec
from seqmix.models import build_model, load_pretrained, model_config, save_pretrained
from seqmix.models.builder import model_from_params, model_params
from seqmix.models.hf import config_from_hf, config_to_hf
from seqmix.testing import assert_close, fresh_seed, relative_error, tolerance

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "fixtures", "hf")
CASES = ("llama2", "llama3", "mistral", "qwen2", "qwen3", "smollm")
TOL = tolerance("float32")


def fixture(case: str) -> str:
    return os.path.join(FIXTURES, case)


def expected(case: str) -> dict[str, np.ndarray]:
    return dict(np.load(os.path.join(fixture(case), "expected.npz")))


def hf_config(case: str) -> dict:
    with open(os.path.join(fixture(case), "config.json")) as f:
        return json.load(f)


def forward(model, tokens):
    return nnx.jit(lambda m, t: m(t))(model, jnp.asarray(tokens))


@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers(case):
    model, _, _ = load_pretrained(fixture(case))
    e = expected(case)
    assert_close(forward(model, e["tokens"]), e["logits"], TOL, f"{case} logits")


def test_fixtures_cover_what_they_claim():
    """Sharded and single-file, float32 and bfloat16, tied and untied, GQA and MQA."""
    seen = {}
    for case in CASES:
        _, config, source = load_pretrained(fixture(case))
        a = config.mixers.attention
        seen[case] = (
            source.shards is not None,
            {np.dtype(d).name for d in source.dtypes.values()},
            bool(config.tie_embeddings),
            a.num_kv_heads,
        )
    assert seen["llama3"][0] and not seen["llama2"][0]
    assert seen["qwen2"][1] == {"bfloat16"} and seen["llama2"][1] == {"float32"}
    assert seen["llama3"][2] and not seen["mistral"][2]
    assert seen["smollm"][3] == 1 and seen["llama3"][3] == 2 and seen["llama2"][3] == 4


def _without(case, change):
    """The fixture's model with ``change(config, params)`` applied, and its logit error."""
    model, config, _ = load_pretrained(fixture(case))
    params = model_params(model)
    config = copy.deepcopy(config)
    change(config, params)
    e = expected(case)
    return relative_error(forward(model_from_params(config, params), e["tokens"]), e["logits"])


def _zero_biases(config, params):
    for path in params:
        if path[-1] == "bias":
            params[path] = np.zeros_like(params[path])


def _unit_qk_norms(config, params):
    for path in params:
        if path[-2] in ("q_norm", "k_norm"):
            params[path] = np.ones_like(params[path])


@pytest.mark.parametrize(
    "case, change",
    [
        ("llama3", lambda c, p: setattr(c.mixers.attention, "rope_scaling", None)),
        ("mistral", lambda c, p: setattr(c.mixers.attention, "local_window_size", None)),
        ("qwen2", _zero_biases),
        ("qwen3", _unit_qk_norms),
        ("llama2", lambda c, p: setattr(c, "norm_eps", 1e-2)),
    ],
    ids=["llama3-scaling", "mistral-window", "qwen2-bias", "qwen3-qk-norm", "llama2-eps"],
)
def test_each_feature_changes_the_fixture_logits(case, change):
    """The comparison above can fail: dropping the feature a fixture exercises moves its
    logits far outside the tolerance."""
    assert _without(case, change) > 100 * TOL


def test_llama3_frequencies_match_transformers():
    config = hf_config("llama3")
    scaling = rope_scaling_spec(
        {k: v for k, v in config["rope_parameters"].items() if k != "rope_theta"}
    )
    theta = config["rope_parameters"]["rope_theta"]
    freqs = rope_frequencies(config["head_dim"], theta=theta, scaling=scaling)
    assert_close(freqs, expected("llama3")["inv_freq"], TOL, "inv_freq")
    plain = rope_frequencies(config["head_dim"], theta=theta)
    scaled = np.asarray(freqs) != np.asarray(plain)
    assert scaled.any() and not scaled.all()  # some frequencies kept, some scaled


@pytest.mark.parametrize("case", CASES)
def test_import_then_export_is_bit_exact(case, tmp_path):
    model, config, source = load_pretrained(fixture(case))
    save_pretrained(model, config, tmp_path, source=source)
    written = sorted(os.listdir(tmp_path))
    stored = sorted(f for f in os.listdir(fixture(case)) if f.endswith((".json", ".safetensors")))
    assert written == [f for f in stored if f != "generation_config.json"]
    for name in written:
        assert filecmp.cmp(os.path.join(fixture(case), name), tmp_path / name, shallow=False), name


def test_export_after_training_step_changes_only_the_values(tmp_path):
    """A changed model is written with the source's names, dtypes and shards."""
    model, config, source = load_pretrained(fixture("llama3"))
    params = model_params(model)
    path = ("backbone", "layers", 1, "mixer", "q_proj", "kernel")
    params[path] = params[path] + 1.0
    save_pretrained(model_from_params(config, params), config, tmp_path, source=source)
    back, _, back_source = load_pretrained(tmp_path)
    assert back_source.shards == source.shards and back_source.dtypes == source.dtypes
    np.testing.assert_array_equal(model_params(back)[path], params[path])


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_export_of_a_seqmix_model_loads_back(tmp_path, tie, dtype):
    config = model_config(
        layers="AAA",
        d_model=32,
        vocab_size=40,
        tie_embeddings=tie,
        mixers={"attention": {"num_heads": 4, "num_kv_heads": 2, "qk_norm": True}},
    )
    model = build_model(config, rngs=nnx.Rngs(fresh_seed()))
    save_pretrained(model, config, tmp_path, dtype=dtype, max_shard_bytes=8192)
    hf = json.loads((tmp_path / "config.json").read_text())
    assert hf["architectures"] == ["Qwen3ForCausalLM"] and hf["torch_dtype"] == dtype
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    back, back_config, _ = load_pretrained(tmp_path)
    want = {
        p: np.asarray(jnp.asarray(v).astype(dtype).astype(jnp.float32))
        for p, v in model_params(model).items()
    }
    got = model_params(back)
    assert set(got) == set(want)
    for p in want:
        np.testing.assert_array_equal(got[p], want[p], err_msg=str(p))
    tokens = jax.random.randint(jax.random.key(fresh_seed()), (2, 9), 0, 40)
    if dtype == "float32":
        assert_close(forward(back, tokens), forward(model, tokens), TOL, "logits")
    assert back_config.mlp.hidden_size == model.backbone.layers[0].mlp.hidden


def test_config_to_hf_rejects_what_hf_cannot_hold():
    with pytest.raises(ValueError, match="layers"):
        config_to_hf(model_config(layers="MA"))
    with pytest.raises(ValueError, match="softcap"):
        config_to_hf(model_config(layers="A", mixers={"attention": {"softcap": 30.0}}))
    with pytest.raises(ValueError, match=r"mlp\.type"):
        config_to_hf(model_config(layers="A", mlp={"type": "gelu"}))


@pytest.mark.parametrize("case", ["llama3", "mistral", "qwen2"])
def test_decoding_with_a_cache_matches_the_full_forward(case):
    """Prefill then one token at a time (RoPE scaling, the ring-buffer window, biases)."""
    model, _, _ = load_pretrained(fixture(case))
    tokens = jnp.asarray(expected(case)["tokens"])
    full = forward(model, tokens)
    cache = model.init_cache(tokens.shape[0], tokens.shape[1])
    logits, cache = model(tokens[:, :5], cache=cache)
    steps = [logits]
    for t in range(5, tokens.shape[1]):
        logits, cache = model(tokens[:, t : t + 1], cache=cache)
        steps.append(logits)
    assert_close(jnp.concatenate(steps, axis=1), full, TOL, "cached logits")


# ---------------------------------------------------------------- configs and errors


def test_older_config_keys_give_the_same_model():
    """transformers 4 writes rope_theta / rope_scaling / torch_dtype; 5 writes
    rope_parameters / dtype. Both read the same."""
    new = hf_config("llama3")
    old = {k: v for k, v in new.items() if k not in ("rope_parameters", "dtype")}
    params = dict(new["rope_parameters"])
    old["rope_theta"] = params.pop("rope_theta")
    old["rope_scaling"] = params
    old["torch_dtype"] = "float32"
    assert config_from_hf(old).to_dict() == config_from_hf(new).to_dict()


def _modified(case, **changes):
    config = hf_config(case)
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    return config


@pytest.mark.parametrize(
    "case, changes, key",
    [
        (
            "llama2",
            {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}},
            "rope_scaling.rope_type",
        ),
        (
            "llama2",
            {"rope_parameters": None, "rope_scaling": {"type": "dynamic", "factor": 2.0}},
            "rope_scaling.rope_type",
        ),
        ("llama2", {"quantization_config": {"quant_method": "gptq"}}, "quantization_config"),
        ("llama2", {"architectures": ["GemmaForCausalLM"]}, "architectures"),
        ("llama2", {"model_type": "mistral"}, "model_type"),
        ("llama2", {"hidden_act": "gelu"}, "hidden_act"),
        ("llama2", {"mlp_bias": True}, "mlp_bias"),
        ("llama2", {"num_hidden_layers": None}, "num_hidden_layers"),
        ("llama2", {"sliding_window": 8}, "sliding_window"),
        ("qwen2", {"layer_types": ["sliding_attention", "full_attention"]}, "layer_types"),
        ("qwen2", {"layer_types": None, "use_sliding_window": True}, "use_sliding_window"),
        ("mistral", {"sliding_window": 0}, "sliding_window"),
    ],
)
def test_unsupported_config_raises_naming_the_key(case, changes, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        config_from_hf(_modified(case, **changes))


def _copy(case, tmp_path):
    dst = tmp_path / case
    shutil.copytree(fixture(case), dst)
    return dst


def test_unsupported_config_in_a_directory_raises(tmp_path):
    path = _copy("smollm", tmp_path)
    config = hf_config("smollm")
    config["rope_parameters"] = {"rope_type": "longrope", "rope_theta": 1e4}
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"rope_scaling\.rope_type 'longrope'"):
        load_pretrained(path)


def test_missing_unexpected_and_misshapen_tensors_raise(tmp_path):
    path = _copy("llama2", tmp_path)
    file = path / "model.safetensors"
    tensors = dict(load_file(file))
    name = "model.layers.1.mlp.up_proj.weight"

    save_file({k: v for k, v in tensors.items() if k != name}, file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=f"missing.*{name}"):
        load_pretrained(path)

    save_file({**tensors, "model.extra.weight": tensors[name]}, file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"unexpected.*model\.extra\.weight"):
        load_pretrained(path)

    save_file({**tensors, name: tensors[name][:, :-1].copy()}, file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=f"{name} has shape"):
        load_pretrained(path)

    wrong = {**tensors, name: tensors[name].astype(np.int32)}
    save_file(wrong, file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=f"{name} has dtype int32"):
        load_pretrained(path)


def test_missing_files_raise(tmp_path):
    with pytest.raises(ValueError, match="directory"):
        load_pretrained(tmp_path / "nothing")
    (tmp_path / "config.json").write_text(json.dumps(hf_config("llama2")))
    with pytest.raises(ValueError, match=r"model\.safetensors"):
        load_pretrained(tmp_path)


def test_bfloat16_checkpoint_becomes_float32_parameters_exactly():
    model, _, _ = load_pretrained(fixture("qwen2"))
    tensors = load_file(os.path.join(fixture("qwen2"), "model.safetensors"))
    name = "model.layers.0.self_attn.k_proj.bias"
    assert tensors[name].dtype == ml_dtypes.bfloat16
    got = model_params(model)[("backbone", "layers", 0, "mixer", "k_proj", "bias")]
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, tensors[name].astype(np.float32))


def test_compute_dtype_bfloat16_stays_close():
    model, config, _ = load_pretrained(fixture("smollm"), dtype="bfloat16")
    assert config.dtype == "bfloat16"
    e = expected("smollm")
    assert relative_error(forward(model, e["tokens"]), e["logits"]) < 3e-2


def test_readme_section_runs(tmp_path, monkeypatch):
    """The Python blocks of README's "Bring your own transformer", as written."""
    root = os.path.join(os.path.dirname(__file__), "..", "..")
    with open(os.path.join(root, "README.md")) as f:
        text = f.read()
    section = text.split("## Bring your own transformer", 1)[1].split("\n## ", 1)[0]
    blocks = [b.split("```", 1)[0] for b in section.split("```python\n")[1:]]
    assert len(blocks) == 2
    monkeypatch.chdir(root)
    code = "\n".join(blocks).replace("/tmp/smollm-copy", str(tmp_path / "copy"))
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    scores = scope["scores"]
    assert scope["student"].replaced == {min(scores, key=scores.get): "mamba2"}
    assert filecmp.cmp(
        os.path.join(fixture("smollm"), "model.safetensors"),
        tmp_path / "copy" / "model.safetensors",
        shallow=False,
    )
