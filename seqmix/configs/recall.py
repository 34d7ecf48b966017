"""The associative-recall study (Zoology's MQAR protocol): one point of the grid.

    seqmix-train --config=recall:mixer=based,d_model=128,seq_len=256,num_kv_pairs=16

Two layers of one mixer (each followed by a SwiGLU MLP), vocabulary 8192, keys and values
from the two halves of it, queries at power-law gaps; accuracy at the answer positions.
Mixed precision (``train.compute_dtype="bfloat16"``): matmuls and the mixers' inputs in
bfloat16; parameters, optimizer state, the residual stream, norms, softmax statistics, decays
and recurrent states in float32 (the layers keep those in float32 whatever the compute dtype);
the loss in float32. Runs are reproducible from ``seed`` on a given device and software.
Arguments: ``mixer`` (attention, based, mamba2, gla, linear_attention, gated_deltanet,
deltanet; or any registered name), ``d_model`` (64, 128, 256, 512),
``seq_len``/``num_kv_pairs`` ((64, 4), (128, 8), (256, 16), (512, 64)), ``lr``, ``steps``,
``batch_size``. The grid runs on a GPU through
``seqmix-recall-sweep`` (see there for how far the training budget is reduced against
Zoology's); ``seqmix-bench-model --preset=recall`` times one training step per mixer.
"""

from seqmix.models import model_config
from seqmix.train.config import base_config, parse_variant

DEFAULTS = dict(
    mixer="based",
    d_model=128,
    seq_len=256,
    num_kv_pairs=16,
    vocab_size=8192,
    lr=3e-3,
    steps=4000,
    batch_size=256,
    layers=2,
)

MIXERS = ("attention", "based", "mamba2", "gla", "linear_attention", "gated_deltanet", "deltanet")
SETTINGS = ((64, 4), (128, 8), (256, 16), (512, 64))
D_MODELS = (64, 128, 256, 512)
# A short CPU pilot of this grid learned faster at 1e-2 than at 3e-3 (docs/benchmarking.md).
LRS = (3e-3, 1e-2)
# The study's points ('mixer:d_model:seq_len:pairs' patterns over the grid): every mixer and
# width on the two hard settings, the two easy ones for attention, BASED and Mamba-2 (64).
STUDY_POINTS = ("*:*:256:16", "*:*:512:64", "attention:*:*:*", "based:*:*:*", "mamba2:*:*:*")


def model_for(mixer: str, d_model: int, vocab_size: int, layers: int = 2):
    """The study's model: ``layers`` blocks of ``mixer`` + MLP at width ``d_model``.

    Every mixer has a path that mixes neighbouring tokens, as in Zoology, where each mixer
    (attention, BASED, GLA, the delta nets) follows a short convolution and Mamba has its
    own: MQAR needs the key at ``t - 1`` beside the value at ``t`` to store the pair. Here
    attention has RoPE, BASED its sliding window, Mamba-2 its convolution; GLA and linear
    attention get a short causal convolution (width 4) on q, k and v. Without it both stay
    near 0.06 on (256, 16) at d_model 128 after 3000 steps at any of three rates (an H200
    pilot, BENCHMARKS.md)."""
    heads = max(1, d_model // 64)
    return model_config(
        kind="causal_lm",
        vocab_size=vocab_size,
        d_model=d_model,
        layers=[mixer] * layers,
        mlp={"type": "swiglu", "expansion": 2.0},
        mixers={
            "attention": {"num_heads": heads},
            "based": {"num_heads": heads, "feature_dim": 16, "window_size": 64},
            "gla": {"num_heads": heads, "short_conv": True},
            "linear_attention": {"num_heads": heads, "feature_map": "elu1", "short_conv": True},
            "mamba2": {"headdim": 32, "d_state": 64, "expand": 2},
            # the delta rule (short convs of their own, as in Zoology's delta nets)
            "gated_deltanet": {"num_heads": heads},
            "deltanet": {"num_heads": heads},
        },
    )


def get_config(arg: str | None = None):
    v = parse_variant(arg, **DEFAULTS)
    config = base_config(model=model_for(v["mixer"], v["d_model"], v["vocab_size"], v["layers"]))
    config.data.task = "mqar"
    config.data.vocab_size = v["vocab_size"]
    config.data.seq_len = v["seq_len"]
    config.data.num_kv_pairs = v["num_kv_pairs"]
    config.data.power_a = 0.01
    config.data.random_non_queries = True
    config.data.num_eval_batches = 8
    config.train.num_steps = v["steps"]
    config.train.batch_size = v["batch_size"]
    config.train.eval_every = max(1, v["steps"] // 5)
    config.train.checkpoint_every = v["steps"]
    config.optimizer.lr = v["lr"]
    config.optimizer.warmup_steps = max(1, v["steps"] // 10)
    config.optimizer.weight_decay = 0.1
    config.train.compute_dtype = "bfloat16"
    return config
