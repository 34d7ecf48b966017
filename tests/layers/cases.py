"""Tiny configurations of every registered mixer, shared by the layer and model tests."""

from __future__ import annotations

from seqmix.models import MIXERS, layer_config, model_config

D_MODEL = 32

# (id, registered name, overrides of config.mixers.<name>): every option that changes the
# computation path (GQA/MQA, window ring buffer, short convs, Taylor map, groups, concat;
# checkpoint options: decoupled head_dim, q/k/v bias, llama3 RoPE; Mamba-2 without gate).
CASES = [
    ("attention", "attention", {"num_kv_heads": 2}),
    (
        "attention-window",
        "attention",
        {"num_kv_heads": 1, "local_window_size": 3, "softcap": 5.0, "qk_norm": True},
    ),
    (
        "attention-llama",
        "attention",
        {
            "num_kv_heads": 2,
            "head_dim": 16,
            "qkv_bias": True,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        },
    ),
    ("linear_attention", "linear_attention", {"short_conv": True}),
    ("retnet", "retnet", {}),
    ("gla", "gla", {"short_conv": True, "gate_low_rank_dim": 4}),
    ("mamba2", "mamba2", {"headdim": 8, "d_state": 8, "ngroups": 2}),
    (
        "mamba2-linear",
        "mamba2",
        {
            "headdim": 8,
            "d_state": 8,
            "conv_activation": None,
            "gated_norm": False,
            "use_bias": True,
        },
    ),
    ("mamba", "mamba", {"d_state": 8}),
    (
        "gated_deltanet",
        "gated_deltanet",
        {"num_heads": 2, "num_v_heads": 4, "head_dim": 8, "expand_v": 1.0, "chunk_size": 4},
    ),
    ("deltanet", "deltanet", {"num_heads": 2, "head_dim": 8, "conv_bias": True}),
    (
        "based",
        "based",
        {"window_size": 3, "feature_dim": 4, "combine": "concat", "short_conv": True},
    ),
]

IDS = [case[0] for case in CASES]


def config_for(name: str, overrides: dict, **model_overrides):
    return model_config(d_model=D_MODEL, vocab_size=50, mixers={name: overrides}, **model_overrides)


def mixer_config_for(name: str, overrides: dict, *, causal: bool = True, **model_overrides):
    return layer_config(config_for(name, overrides, **model_overrides), name, causal=causal)


def covered() -> set[str]:
    return {name for _, name, _ in CASES}


assert covered() == set(MIXERS), "add a test case for every registered mixer"
