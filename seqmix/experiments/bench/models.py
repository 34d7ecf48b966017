"""The benchmark models: ~125M-parameter causal LMs of each mixer (``bench_model``,
``bench_sequence_parallel``)."""

from __future__ import annotations


def model_config_125m(
    mixer: str, T: int, *, layers: int = 12, d_model: int = 768, vocab: int = 32768
):
    """The benchmark's model config of ``mixer`` (``layers`` x ``d_model``, SwiGLU MLPs, tied
    ``vocab``, bf16 compute; ``hybrid`` = MMMA, 3 mamba2 : 1 attention; head dim 64)."""
    from seqmix.models import model_config

    n = layers
    names = ("MMMA" * n)[:n] if mixer == "hybrid" else [mixer] * n
    heads = max(1, d_model // 64)  # head dim 64
    return model_config(
        kind="causal_lm",
        vocab_size=vocab,
        d_model=d_model,
        layers=names,
        mlp={"type": "swiglu", "expansion": 4.0},
        dtype="bfloat16",
        max_length=T,
        mixers={
            "attention": {"num_heads": heads},
            "gla": {"num_heads": heads},
            "based": {"num_heads": heads, "feature_dim": 16, "window_size": 64},
            "mamba2": {"headdim": 64, "d_state": 128, "expand": 2},
        },
    )
