"""Hugging Face Llama-family checkpoints <-> seqmix: a pure mapping of configs, tensor names
and shapes (no file access; ``seqmix.models.pretrained`` reads and writes the files).

Supported ``architectures``: ``LlamaForCausalLM`` (Llama 2/3, SmolLM, TinyLlama, ...),
``MistralForCausalLM``, ``Qwen2ForCausalLM`` (Qwen2, Qwen2.5) and ``Qwen3ForCausalLM``
(dense). Every layer becomes an ``attention`` mixer: GQA heads (``num_key_value_heads``),
``head_dim`` (which may differ from ``hidden_size / num_attention_heads``), RoPE in the
rotate-half layout with ``rope_theta`` and Llama 3's ``rope_scaling``, Qwen2's q/k/v bias
(``qkv_bias``), Llama's ``attention_bias`` (``use_bias``), Qwen3's per-head q/k RMSNorm
(``qk_norm``), Mistral's sliding window (``local_window_size = sliding_window - 1``: HF
lets a query see the ``sliding_window`` latest keys, itself included), a SwiGLU MLP of
width ``intermediate_size``, RMSNorm ``x / rms(x) * w`` with ``rms_norm_eps`` everywhere,
tied or untied embeddings.

A config key outside this list, or a value the mapping cannot honour (another
``rope_scaling`` type, Qwen's sliding-window layers, ``hidden_act`` other than silu, an MLP
bias, ...), raises a ValueError that names the key.

Tensors: HF ``nn.Linear`` weights are ``[out, in]``, seqmix ``Dense`` kernels ``[in, out]``
(transposed); embeddings and norm scales keep their shape.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from seqmix.layers.mlp import hidden_size
from seqmix.layers.rotary import ROPE_SCALING, rope_scaling_spec
from seqmix.models.config import layer_names, model_config

Path = tuple[str | int, ...]


@dataclasses.dataclass(frozen=True)
class Architecture:
    """What one HF architecture adds to the Llama layout."""

    name: str  # the ``architectures`` entry
    model_type: str
    qkv_bias: bool = False  # q/k/v biases always present (Qwen2)
    qk_norm: bool = False  # per-head q/k RMSNorm (Qwen3)
    keys: frozenset[str] = frozenset()  # config keys beyond the common ones


ARCHITECTURES: dict[str, Architecture] = {
    a.name: a
    for a in (
        Architecture(
            "LlamaForCausalLM",
            "llama",
            keys=frozenset({"attention_bias", "mlp_bias", "pretraining_tp", "head_dim"}),
        ),
        Architecture(
            "MistralForCausalLM", "mistral", keys=frozenset({"sliding_window", "head_dim"})
        ),
        Architecture(
            "Qwen2ForCausalLM",
            "qwen2",
            qkv_bias=True,
            keys=frozenset(
                {"use_sliding_window", "sliding_window", "max_window_layers", "layer_types"}
            ),
        ),
        Architecture(
            "Qwen3ForCausalLM",
            "qwen3",
            qk_norm=True,
            keys=frozenset(
                {
                    "attention_bias",
                    "head_dim",
                    "use_sliding_window",
                    "sliding_window",
                    "max_window_layers",
                    "layer_types",
                }
            ),
        ),
    )
}

# Keys every architecture has; they map onto the seqmix config.
COMMON_KEYS = frozenset(
    {
        "architectures",
        "model_type",
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "hidden_act",
        "max_position_embeddings",
        "rms_norm_eps",
        "rope_theta",
        "rope_scaling",
        "rope_parameters",
        "tie_word_embeddings",
        "attention_dropout",
    }
)

# Keys that do not change what the network computes (token ids, dtype of the files,
# bookkeeping); they are kept for export and otherwise ignored.
IGNORED_KEYS = frozenset(
    {
        "_name_or_path",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "torch_dtype",
        "dtype",
        "transformers_version",
        "initializer_range",
        "use_cache",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
        "tokenizer_class",
    }
)


def architecture_of(hf_config: Mapping[str, Any]) -> Architecture:
    """The supported architecture named by ``architectures`` (exactly one entry)."""
    archs = hf_config.get("architectures")
    if not isinstance(archs, (list, tuple)) or len(archs) != 1:
        raise ValueError(
            f"config.json: architectures must name one architecture, got {archs!r}; "
            f"supported: {sorted(ARCHITECTURES)}"
        )
    if archs[0] not in ARCHITECTURES:
        raise ValueError(
            f"config.json: architectures {archs[0]!r} is not supported; supported: "
            f"{sorted(ARCHITECTURES)}"
        )
    arch = ARCHITECTURES[archs[0]]
    model_type = hf_config.get("model_type", arch.model_type)
    if model_type != arch.model_type:
        raise ValueError(
            f"config.json: model_type {model_type!r} does not match architectures "
            f"{arch.name!r} (expected {arch.model_type!r})"
        )
    return arch


def _require(hf: Mapping[str, Any], key: str) -> Any:
    if key not in hf or hf[key] is None:
        raise ValueError(f"config.json: missing required key {key!r}")
    return hf[key]


def _rope(hf: Mapping[str, Any]) -> tuple[float, dict | None]:
    """``(rope_theta, rope_scaling)`` from ``rope_theta``/``rope_scaling`` or the newer
    ``rope_parameters`` (which holds ``rope_theta`` and the scaling keys together)."""
    params = hf.get("rope_parameters")
    if params is not None:
        params = dict(params)
        theta = params.pop("rope_theta", hf.get("rope_theta", 10000.0))
        kind = params.get("rope_type", params.get("type", "default"))
        scaling = None if kind == "default" else params
        if scaling is None and set(params) - {"rope_type", "type"}:
            extra = sorted(set(params) - {"rope_type", "type"})
            raise ValueError(f"config.json: rope_parameters has unsupported keys {extra}")
    else:
        theta = hf.get("rope_theta", 10000.0)
        scaling = hf.get("rope_scaling")
        if scaling is not None:
            kind = scaling.get("rope_type", scaling.get("type"))
            scaling = None if kind == "default" else dict(scaling)
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind not in ROPE_SCALING:
            raise ValueError(
                f"config.json: rope_scaling.rope_type {kind!r} is not supported; supported: "
                f"{sorted(ROPE_SCALING)} (or none)"
            )
        scaling = {k: v for k, v in scaling.items() if k != "type"} | {"rope_type": kind}
        rope_scaling_spec(scaling)  # checks the type's keys
    return float(theta), scaling


def _window(hf: Mapping[str, Any], arch: Architecture, num_layers: int) -> int | None:
    """``local_window_size`` (or None) from the architecture's sliding-window keys."""
    if arch.model_type == "mistral":
        sw = hf.get("sliding_window")
        if sw is None:
            return None
        if int(sw) < 1:
            raise ValueError(f"config.json: sliding_window must be >= 1 or null, got {sw!r}")
        return int(sw) - 1
    if "sliding_window" in arch.keys:  # Qwen: windows only where layer_types says so
        types = hf.get("layer_types")
        if types is not None:
            if len(types) != num_layers or any(t != "full_attention" for t in types):
                raise ValueError(
                    f"config.json: layer_types {types!r} is not supported (only "
                    f"'full_attention' layers)"
                )
        elif hf.get("use_sliding_window", False):
            raise ValueError("config.json: use_sliding_window true is not supported")
    return None


def config_from_hf(hf_config: Mapping[str, Any], *, dtype: str = "float32"):
    """The seqmix model config (``model_config``) of an HF ``config.json``.

    ``dtype`` is the compute dtype (parameters are float32 either way). Raises ValueError
    naming the first unsupported key or value.
    """
    hf = dict(hf_config)
    arch = architecture_of(hf)
    unknown = sorted(set(hf) - COMMON_KEYS - IGNORED_KEYS - arch.keys)
    if unknown:
        raise ValueError(
            f"config.json: unsupported key(s) {unknown} for {arch.name} (seqmix maps "
            f"{sorted(COMMON_KEYS | arch.keys)} and ignores {sorted(IGNORED_KEYS)})"
        )
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"config.json: hidden_act {act!r} is not supported (only 'silu')")
    if hf.get("mlp_bias", False):
        raise ValueError("config.json: mlp_bias true is not supported")
    if float(hf.get("attention_dropout", 0.0) or 0.0) != 0.0:
        raise ValueError(
            f"config.json: attention_dropout {hf['attention_dropout']!r} is not supported (only 0)"
        )
    d_model = int(_require(hf, "hidden_size"))
    num_layers = int(_require(hf, "num_hidden_layers"))
    heads = int(_require(hf, "num_attention_heads"))
    kv_heads = int(hf.get("num_key_value_heads") or heads)
    head_dim = hf.get("head_dim")
    head_dim = d_model // heads if head_dim is None else int(head_dim)
    theta, scaling = _rope(hf)
    use_bias = bool(hf.get("attention_bias", False))
    attention = {
        "num_heads": heads,
        "num_kv_heads": kv_heads,
        "head_dim": head_dim,
        "rope": True,
        "rope_theta": theta,
        "rope_scaling": scaling,
        "local_window_size": _window(hf, arch, num_layers),
        "softcap": None,
        "qk_norm": arch.qk_norm,
        "use_bias": use_bias,
        "qkv_bias": arch.qkv_bias,
    }
    return model_config(
        kind="causal_lm",
        vocab_size=int(_require(hf, "vocab_size")),
        d_model=d_model,
        layers=["attention"] * num_layers,
        mlp={"type": "swiglu", "hidden_size": int(_require(hf, "intermediate_size"))},
        # False when absent: the default of every supported architecture's config class
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        dtype=dtype,
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        max_length=int(hf.get("max_position_embeddings", 2048)),
        mixers={"attention": attention},
    )


def _plain_dict(value) -> dict | None:
    if value is None:
        return None
    return value.to_dict() if hasattr(value, "to_dict") else dict(value)


def _unsupported(key: str, value, why: str) -> ValueError:
    return ValueError(f"config {key}={value!r} has no Hugging Face Llama-family form: {why}")


def config_to_hf(config, *, torch_dtype: str = "float32") -> dict[str, Any]:
    """The HF ``config.json`` dict of a seqmix model config whose layers are all attention
    with RoPE and a SwiGLU MLP: Qwen3 when it has ``qk_norm``, Qwen2 when it has q/k/v
    biases only, Mistral with a sliding window, Llama otherwise.

    Raises ValueError naming the first config key with no such form.
    """
    names = layer_names(config)
    if set(names) != {"attention"}:
        other = sorted(set(names) - {"attention"})
        raise _unsupported("layers", other, "every layer must be attention")
    if config.kind != "causal_lm":
        raise _unsupported("kind", config.kind, "only causal_lm")
    if config.mlp.type != "swiglu":
        raise _unsupported("mlp.type", config.mlp.type, "only swiglu")
    a = config.mixers.attention
    if not a.rope:
        raise _unsupported("mixers.attention.rope", a.rope, "RoPE is required")
    if a.softcap is not None:
        raise _unsupported("mixers.attention.softcap", a.softcap, "no logit softcap")
    d_model = int(config.d_model)
    heads = int(a.num_heads)
    head_dim = d_model // heads if a.head_dim is None else int(a.head_dim)
    qkv_bias = bool(a.get("qkv_bias", False)) and not a.use_bias
    window = a.local_window_size
    if isinstance(window, (tuple, list)):
        raise _unsupported("mixers.attention.local_window_size", window, "one int or None")
    if a.qk_norm:
        arch = ARCHITECTURES["Qwen3ForCausalLM"]
        if qkv_bias:
            raise _unsupported("mixers.attention.qkv_bias", True, "not with qk_norm")
    elif qkv_bias:
        arch = ARCHITECTURES["Qwen2ForCausalLM"]
        if a.use_bias:
            raise _unsupported("mixers.attention.use_bias", True, "not with qkv_bias")
    elif window is not None:
        arch = ARCHITECTURES["MistralForCausalLM"]
        if a.use_bias:
            raise _unsupported("mixers.attention.use_bias", True, "not with a window")
    else:
        arch = ARCHITECTURES["LlamaForCausalLM"]
    if window is not None and arch.model_type != "mistral":
        raise _unsupported(
            "mixers.attention.local_window_size", window, "only without qk_norm and biases"
        )
    mlp = config.mlp
    hf: dict[str, Any] = {
        "architectures": [arch.name],
        "model_type": arch.model_type,
        "vocab_size": int(config.vocab_size),
        "hidden_size": d_model,
        "intermediate_size": int(
            mlp.get("hidden_size")
            or hidden_size(d_model, "swiglu", float(mlp.expansion), int(mlp.multiple_of))
        ),
        "num_hidden_layers": len(names),
        "num_attention_heads": heads,
        "num_key_value_heads": heads if a.num_kv_heads is None else int(a.num_kv_heads),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": int(config.max_length),
        "rms_norm_eps": float(config.norm_eps),
        "rope_theta": float(a.rope_theta),
        "rope_scaling": _plain_dict(a.get("rope_scaling")),
        "tie_word_embeddings": bool(config.tie_embeddings),
        "attention_dropout": 0.0,
        "torch_dtype": torch_dtype,
    }
    if arch.model_type in ("llama", "qwen3"):
        hf["attention_bias"] = bool(a.use_bias)
    if arch.model_type == "llama":
        hf["mlp_bias"] = False
    if arch.model_type == "mistral":
        hf["sliding_window"] = int(window) + 1
    if arch.model_type in ("qwen2", "qwen3"):
        hf["use_sliding_window"] = False
        if arch.model_type == "qwen2" and head_dim != d_model // heads:
            raise _unsupported("mixers.attention.head_dim", head_dim, "Qwen2 has no head_dim key")
    return hf


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One HF tensor: the seqmix parameter path it holds, whether it is transposed
    (``nn.Linear [out, in]`` <-> ``Dense [in, out]``) and its HF shape."""

    path: Path
    transpose: bool
    shape: tuple[int, ...]


def tensor_specs(config) -> dict[str, TensorSpec]:
    """Every HF tensor name of a Llama-family model with seqmix ``config`` (every layer
    attention), in HF's order, mapped to its seqmix parameter."""
    names = layer_names(config)
    if set(names) != {"attention"}:
        raise _unsupported("layers", sorted(set(names)), "every layer must be attention")
    a = config.mixers.attention
    D = int(config.d_model)
    H = int(a.num_heads)
    Hkv = H if a.num_kv_heads is None else int(a.num_kv_heads)
    hd = D // H if a.head_dim is None else int(a.head_dim)
    mlp = config.mlp
    F = int(
        mlp.get("hidden_size")
        or hidden_size(D, mlp.type, float(mlp.expansion), int(mlp.get("multiple_of", 8)))
    )
    V = int(config.vocab_size)
    qkv_bias = bool(a.use_bias) or bool(a.get("qkv_bias", False))
    specs: dict[str, TensorSpec] = {
        "model.embed_tokens.weight": TensorSpec(("backbone", "embed", "embedding"), False, (V, D))
    }
    for i in range(len(names)):
        pre, layer = f"model.layers.{i}.", ("backbone", "layers", i)
        att, mix = pre + "self_attn.", (*layer, "mixer")
        for proj, out in (("q_proj", H * hd), ("k_proj", Hkv * hd), ("v_proj", Hkv * hd)):
            specs[att + proj + ".weight"] = TensorSpec((*mix, proj, "kernel"), True, (out, D))
            if qkv_bias:
                specs[att + proj + ".bias"] = TensorSpec((*mix, proj, "bias"), False, (out,))
        specs[att + "o_proj.weight"] = TensorSpec((*mix, "o_proj", "kernel"), True, (D, H * hd))
        if a.use_bias:
            specs[att + "o_proj.bias"] = TensorSpec((*mix, "o_proj", "bias"), False, (D,))
        if a.qk_norm:
            specs[att + "q_norm.weight"] = TensorSpec((*mix, "q_norm", "scale"), False, (hd,))
            specs[att + "k_norm.weight"] = TensorSpec((*mix, "k_norm", "scale"), False, (hd,))
        for proj, ours, shape in (
            ("gate_proj", "gate", (F, D)),
            ("up_proj", "up", (F, D)),
            ("down_proj", "down", (D, F)),
        ):
            specs[pre + f"mlp.{proj}.weight"] = TensorSpec(
                (*layer, "mlp", ours, "kernel"), True, shape
            )
        specs[pre + "input_layernorm.weight"] = TensorSpec((*layer, "norm", "scale"), False, (D,))
        specs[pre + "post_attention_layernorm.weight"] = TensorSpec(
            (*layer, "mlp_norm", "scale"), False, (D,)
        )
    specs["model.norm.weight"] = TensorSpec(("backbone", "final_norm", "scale"), False, (D,))
    if not config.tie_embeddings:
        specs["lm_head.weight"] = TensorSpec(("head", "kernel"), True, (V, D))
    return specs


# Buffers some older checkpoints store beside the weights; they are recomputed, not loaded.
SKIPPED_SUFFIXES = (".rotary_emb.inv_freq",)


def params_from_hf(tensors: Mapping[str, Any], config) -> dict[Path, Any]:
    """seqmix parameter path -> array (HF tensors transposed where needed, dtype kept).

    Raises ValueError for missing tensors, unexpected ones, and shape mismatches (naming
    the tensor and both shapes). A tied model may also carry ``lm_head.weight`` equal to
    the embedding; it is checked and dropped.
    """
    specs = tensor_specs(config)
    names = {n for n in tensors if not n.endswith(SKIPPED_SUFFIXES)}
    if config.tie_embeddings and "lm_head.weight" in names:
        if not np.array_equal(
            np.asarray(tensors["lm_head.weight"]), np.asarray(tensors["model.embed_tokens.weight"])
        ):
            raise ValueError(
                "checkpoint: tie_word_embeddings is true but lm_head.weight differs from "
                "model.embed_tokens.weight"
            )
        names.discard("lm_head.weight")
    missing = sorted(set(specs) - names)
    unexpected = sorted(names - set(specs))
    if missing or unexpected:
        raise ValueError(
            f"checkpoint tensors do not match the config: missing {missing[:8]}"
            f"{' ...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
            f"{' ...' if len(unexpected) > 8 else ''}"
        )
    params = {}
    for name, spec in specs.items():
        x = np.asarray(tensors[name])
        if tuple(x.shape) != spec.shape:
            raise ValueError(
                f"checkpoint tensor {name} has shape {tuple(x.shape)}, the config expects "
                f"{spec.shape}"
            )
        params[spec.path] = x.T if spec.transpose else x
    return params


def params_to_hf(params: Mapping[Path, Any], config, dtypes: Mapping[str, Any]) -> dict[str, Any]:
    """HF tensor name -> contiguous numpy array in ``dtypes[name]`` (the inverse of
    ``params_from_hf``; float32 values that came from a bf16 file cast back exactly)."""
    out = {}
    for name, spec in tensor_specs(config).items():
        if spec.path not in params:
            raise ValueError(f"the model has no parameter {'.'.join(map(str, spec.path))}")
        x = np.asarray(params[spec.path])
        x = x.T if spec.transpose else x
        if tuple(x.shape) != spec.shape:
            raise ValueError(f"parameter for {name} has shape {x.shape}, expected {spec.shape}")
        out[name] = np.ascontiguousarray(x.astype(dtypes[name]))
    return out
