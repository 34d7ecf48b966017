"""Reading and writing Hugging Face checkpoint directories (``config.json`` and
safetensors files, sharded or not) as seqmix ``CausalLM`` models; no network.

    from seqmix.models import load_pretrained, save_pretrained
    model, config, source = load_pretrained("path/to/SmolLM2-135M")
    logits = model(tokens)                          # [B, T, vocab] float32
    save_pretrained(model, config, "path/to/copy", source=source)

The name and shape mapping is ``seqmix.models.hf``; this module only moves files. The
weights are read with ``safetensors.numpy``; bfloat16 tensors arrive as ``ml_dtypes``
arrays and become float32 parameters exactly, so writing them back in bfloat16 restores
every bit.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any, NamedTuple

import ml_dtypes
import numpy as np
from safetensors.numpy import load_file, save_file

from seqmix.models.builder import model_from_params, model_params
from seqmix.models.causal_lm import CausalLM
from seqmix.models.hf import (
    config_from_hf,
    config_to_hf,
    params_from_hf,
    params_to_hf,
    tensor_specs,
)

CONFIG = "config.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
METADATA = {"format": "pt"}  # what transformers writes and expects in each file

# dtype names as HF configs write them (torch_dtype) -> numpy dtypes.
DTYPES = {
    "float32": np.dtype(np.float32),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype(np.float16),
}


@dataclasses.dataclass(frozen=True)
class Source:
    """What ``load_pretrained`` read besides the weights, so that ``save_pretrained``
    writes the same files back: the ``config.json`` dict, every stored tensor's dtype (in
    file order of names), the shard of each tensor (None: one ``model.safetensors``) and
    the index's ``metadata``."""

    hf_config: dict[str, Any]
    dtypes: dict[str, np.dtype]
    shards: dict[str, str] | None = None
    index_metadata: dict[str, Any] | None = None


class Pretrained(NamedTuple):
    model: CausalLM
    config: Any  # the seqmix model ConfigDict
    source: Source


def read_checkpoint(
    path: str | os.PathLike,
) -> tuple[dict[str, Any], dict[str, np.ndarray], dict[str, str] | None, dict | None]:
    """``(config.json dict, tensors, shard of each tensor or None, index metadata or None)``
    of a checkpoint directory holding ``config.json`` and ``model.safetensors`` or
    ``model.safetensors.index.json`` with its shards."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ValueError(f"path must be a checkpoint directory, got {path!r}")
    config_file = os.path.join(path, CONFIG)
    if not os.path.isfile(config_file):
        raise ValueError(f"path {path!r} has no {CONFIG}")
    with open(config_file) as f:
        hf_config = json.load(f)
    index_file = os.path.join(path, INDEX)
    if os.path.isfile(index_file):
        with open(index_file) as f:
            index = json.load(f)
        weight_map = dict(index.get("weight_map") or {})
        if not weight_map:
            raise ValueError(f"{index_file}: weight_map is missing or empty")
        tensors: dict[str, np.ndarray] = {}
        for shard in sorted(set(weight_map.values())):
            loaded = load_file(os.path.join(path, shard))
            listed = {n for n, s in weight_map.items() if s == shard}
            if set(loaded) != listed:
                raise ValueError(
                    f"{shard}: holds {sorted(set(loaded) - listed)[:4]} not in {INDEX}, lacks "
                    f"{sorted(listed - set(loaded))[:4]}"
                )
            tensors.update(loaded)
        return hf_config, tensors, weight_map, dict(index.get("metadata") or {})
    single = os.path.join(path, SINGLE)
    if os.path.isfile(single):
        return hf_config, load_file(single), None, None
    found = sorted(os.listdir(path))
    raise ValueError(
        f"path {path!r} has neither {SINGLE} nor {INDEX} (found {found}); only safetensors "
        f"checkpoints are read"
    )


def load_pretrained(path: str | os.PathLike, *, dtype: str = "float32") -> Pretrained:
    """Loads a local HF Llama-family checkpoint directory (see ``seqmix.models.hf``).

    Args:
      path: a directory with ``config.json`` and ``model.safetensors`` (or
        ``model.safetensors.index.json`` and its shards). Tokenizer files are not read.
      dtype: the model's compute dtype (``"float32"`` or ``"bfloat16"``); parameters are
        float32 whatever the files hold (float32, bfloat16 or float16).

    Returns:
      ``Pretrained(model, config, source)``: the ``CausalLM``, its seqmix model config and
      the ``Source`` that ``save_pretrained`` needs to write the same files back.

    Raises ValueError for an unsupported config key or value (naming it), missing,
    unexpected or misshapen tensors, and missing files.
    """
    hf_config, tensors, shards, index_metadata = read_checkpoint(path)
    config = config_from_hf(hf_config, dtype=dtype)
    for name, x in tensors.items():
        if x.dtype not in DTYPES.values():
            raise ValueError(f"tensor {name} has dtype {x.dtype}; expected one of {list(DTYPES)}")
    params = params_from_hf(tensors, config)
    source = Source(
        hf_config=hf_config,
        dtypes={name: tensors[name].dtype for name in sorted(tensors) if name in _stored(config)},
        shards=shards,
        index_metadata=index_metadata,
    )
    return Pretrained(model_from_params(config, params), config, source)


def _stored(config) -> set[str]:
    """The tensor names a checkpoint of ``config`` holds (a tied head may be stored too)."""
    return set(tensor_specs(config)) | {"lm_head.weight"}


def _check_matches(config, hf_config) -> None:
    """Raises ValueError when ``config`` does not describe the model of ``hf_config``."""
    theirs = config_from_hf(hf_config, dtype=config.dtype)
    for key in ("vocab_size", "d_model", "norm_eps", "tie_embeddings"):
        if theirs[key] != config[key]:
            raise ValueError(
                f"config.{key} is {config[key]!r}; the source's config.json gives {theirs[key]!r}"
            )
    if tensor_specs(theirs) != tensor_specs(config):
        raise ValueError("the model's layers do not match the source's config.json")
    ours, their_att = config.mixers.attention.to_dict(), theirs.mixers.attention.to_dict()
    for key, value in their_att.items():
        if ours.get(key) != value:
            raise ValueError(
                f"config.mixers.attention.{key} is {ours.get(key)!r}; the source's "
                f"config.json gives {value!r}"
            )


def save_pretrained(
    model: CausalLM,
    config,
    path: str | os.PathLike,
    *,
    source: Source | None = None,
    dtype: str | None = None,
    max_shard_bytes: int | None = None,
) -> None:
    """Writes ``model`` as an HF checkpoint directory: ``config.json`` and safetensors.

    With ``source`` (from ``load_pretrained``) the files repeat the source's: the same
    ``config.json``, tensor names, dtypes and shards, so that loading then saving an
    unchanged model gives bit-identical tensors. Without it the config is
    ``seqmix.models.hf.config_to_hf(config)`` and the tensors are float32.

    Args:
      model: a ``CausalLM`` whose layers are all attention (see ``config_to_hf``).
      config: its seqmix model config.
      path: the directory (created if needed; other files in it are left alone).
      source: the ``Source`` of the checkpoint the model was loaded from.
      dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``: store every tensor in it
        (and say so in ``config.json``) instead of the source's dtypes.
      max_shard_bytes: without a sharded source, split into shards of at most this many
        bytes (``model-0000i-of-0000n.safetensors`` and the index); None: one file.
    """
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)} or None, got {dtype!r}")
    specs = tensor_specs(config)
    if source is not None:
        _check_matches(config, source.hf_config)
        hf_config = dict(source.hf_config)
        names = list(source.dtypes)
        dtypes = dict(source.dtypes)
    else:
        hf_config = config_to_hf(config, torch_dtype=dtype or "float32")
        names = list(specs)
        dtypes = {}
    if dtype is not None:
        dtypes = dict.fromkeys(names, DTYPES[dtype])
        for key in ("torch_dtype", "dtype"):
            if key in hf_config or (key == "torch_dtype" and "dtype" not in hf_config):
                hf_config[key] = dtype
    elif not dtypes:
        dtypes = dict.fromkeys(names, DTYPES["float32"])
    tensors = params_to_hf(model_params(model), config, dtypes)
    if "lm_head.weight" in names and "lm_head.weight" not in specs:  # a stored tied head
        emb = tensors["model.embed_tokens.weight"]
        tensors["lm_head.weight"] = emb.astype(dtypes["lm_head.weight"])
    tensors = {name: tensors[name] for name in names}

    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, CONFIG), "w") as f:
        f.write(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    shards = source.shards if source is not None else None
    if shards is None and max_shard_bytes is not None:
        shards = _plan_shards(tensors, int(max_shard_bytes))
    if shards is None:
        save_file(tensors, os.path.join(path, SINGLE), metadata=METADATA)
        return
    for shard in sorted(set(shards.values())):
        part = {n: t for n, t in tensors.items() if shards[n] == shard}
        save_file(part, os.path.join(path, shard), metadata=METADATA)
    metadata = dict(source.index_metadata or {}) if source is not None else {}
    metadata["total_size"] = int(sum(t.nbytes for t in tensors.values()))
    if "total_parameters" in metadata:
        metadata["total_parameters"] = int(sum(t.size for t in tensors.values()))
    index = {"metadata": metadata, "weight_map": dict(sorted(shards.items()))}
    with open(os.path.join(path, INDEX), "w") as f:
        f.write(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _plan_shards(tensors: Mapping[str, np.ndarray], max_bytes: int) -> dict[str, str]:
    """Tensor -> shard file, filling shards of at most ``max_bytes`` in name order (a
    tensor larger than that gets a shard of its own)."""
    if max_bytes < 1:
        raise ValueError(f"max_shard_bytes must be >= 1, got {max_bytes}")
    groups: list[list[str]] = [[]]
    size = 0
    for name, t in tensors.items():
        if groups[-1] and size + t.nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += t.nbytes
    n = len(groups)
    return {
        name: f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        for i, group in enumerate(groups)
        for name in group
    }
