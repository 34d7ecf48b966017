"""Creates the tiny Hugging Face checkpoints that tests/models/test_hf.py loads.

For each case below: a random model of that architecture built with `transformers`, every
parameter drawn at random (norm weights near 1, biases non-zero, so that a swapped or
dropped tensor changes the logits), saved with `save_pretrained` (config.json,
generation_config.json, safetensors; sharded where the case says so) under
tests/fixtures/hf/<case>/, and `expected.npz` beside it: fixed `tokens [2, 12]` and the
float32 `logits [2, 12, vocab]` of the saved checkpoint as transformers loads it in
float32 (eager attention; bfloat16 weights upcast exactly), and for Llama 3 the rotary
frequencies `inv_freq`.

Needs torch and transformers (not seqmix's dependencies; CI does not run this):

    python -m venv /tmp/hf && /tmp/hf/bin/pip install torch transformers safetensors
    /tmp/hf/bin/python scripts/make_hf_fixtures.py [--out tests/fixtures/hf]
"""

from __future__ import annotations

import argparse
import os
import shutil

import numpy as np
import torch
import transformers

SMALL = dict(
    vocab_size=48,
    hidden_size=32,
    intermediate_size=40,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=64,
)

# case -> (config class, model class, config overrides, dtype, max_shard_size)
CASES = {
    # Llama 2 layout (MHA, untied), with attention_bias to cover biases on q, k, v and o.
    "llama2": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(
            num_key_value_heads=4, tie_word_embeddings=False, attention_bias=True, rms_norm_eps=1e-5
        ),
        torch.float32,
        None,
    ),
    # Llama 3: GQA, tied, rope_theta 5e5 and llama3 frequency scaling (frequencies on both
    # sides of the interpolated band), sharded files with an index.
    "llama3": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(
            num_key_value_heads=2,
            tie_word_embeddings=True,
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 256,
            },
            rms_norm_eps=1e-5,
            max_position_embeddings=512,
        ),
        torch.float32,
        "20KB",
    ),
    # Mistral: GQA, untied, a sliding window shorter than the 12 test tokens.
    "mistral": (
        "MistralConfig",
        "MistralForCausalLM",
        dict(num_key_value_heads=2, tie_word_embeddings=False, sliding_window=4),
        torch.float32,
        None,
    ),
    # Qwen2 / 2.5: q/k/v biases, GQA, tied, bfloat16 files.
    "qwen2": (
        "Qwen2Config",
        "Qwen2ForCausalLM",
        dict(num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1000000.0),
        torch.bfloat16,
        None,
    ),
    # Qwen3 dense: per-head q/k RMSNorm, head_dim 16 != hidden_size / heads, untied.
    "qwen3": (
        "Qwen3Config",
        "Qwen3ForCausalLM",
        dict(num_key_value_heads=2, head_dim=16, tie_word_embeddings=False, rope_theta=1000000.0),
        torch.float32,
        None,
    ),
    # SmolLM (Llama architecture): MQA (one key/value head), tied, bfloat16 files.
    "smollm": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(num_key_value_heads=1, tie_word_embeddings=True, rms_norm_eps=1e-5),
        torch.bfloat16,
        None,
    ),
}


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random: norm weights 1 + N(0, 0.2), embeddings N(0, 1), biases
    N(0, 0.1), matrices N(0, 0.5 / sqrt(fan_in))."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif "embed_tokens" in name:
                p.copy_(noise)
            elif name.endswith(".bias"):
                p.copy_(0.1 * noise)
            else:
                p.copy_(noise * 0.5 / p.shape[1] ** 0.5)


def make(case: str, out: str, seed: int) -> None:
    config_cls, model_cls, overrides, dtype, shard = CASES[case]
    config = getattr(transformers, config_cls)(**{**SMALL, **overrides})
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    randomize(model, seed)
    model = model.to(dtype)
    path = os.path.join(out, case)
    shutil.rmtree(path, ignore_errors=True)
    kwargs = {} if shard is None else {"max_shard_size": shard}
    model.save_pretrained(path, **kwargs)
    tokens = np.random.RandomState(seed).randint(0, SMALL["vocab_size"], size=(2, 12))
    # The reference is the saved checkpoint as transformers loads it in float32 (a model
    # cast with .to() would also have cast its rotary frequencies to bfloat16).
    model = (
        getattr(transformers, model_cls)
        .from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
        .eval()
    )
    with torch.no_grad():
        logits = model(torch.as_tensor(tokens)).logits.float().numpy()
    expected = {"tokens": tokens.astype(np.int32), "logits": logits.astype(np.float32)}
    rotary = getattr(model.model, "rotary_emb", None)
    if case == "llama3" and rotary is not None:
        expected["inv_freq"] = rotary.inv_freq.float().numpy()
    np.savez(os.path.join(path, "expected.npz"), **expected)
    size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
    print(f"{case}: {sorted(os.listdir(path))} {size / 1024:.0f} KB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.path.join("tests", "fixtures", "hf"))
    parser.add_argument("--cases", nargs="*", default=sorted(CASES))
    args = parser.parse_args()
    print(f"transformers {transformers.__version__}, torch {torch.__version__}")
    for case in args.cases:
        make(case, args.out, seed=sorted(CASES).index(case))


if __name__ == "__main__":
    main()
