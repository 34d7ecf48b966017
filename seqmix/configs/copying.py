"""Selective copying (the Mamba paper's synthetic task): copy the scattered data tokens in order.

    seqmix-train --config=copying   # or: python -m seqmix.experiments.train --config=copying

Workdir ~/seqmix-runs/copying. Variants by argument, e.g.
``--config=copying:mixer=attention,seq_len=256``: ``mixer`` (any name in
``seqmix.models.MIXERS``; default a mamba2 + attention hybrid), ``layers``, ``d_model``,
``seq_len`` (whole row: region plus markers), ``num_tokens``, ``vocab_size``, ``steps``,
``batch_size``, ``lr``.
"""

from seqmix.models import model_config
from seqmix.train.config import base_config, parse_variant

DEFAULTS = dict(
    mixer="",
    layers=2,
    d_model=64,
    vocab_size=16,
    seq_len=128,
    num_tokens=16,
    steps=3000,
    batch_size=64,
    lr=2e-3,
)
HYBRID = ["mamba2", "attention"]


def get_config(arg: str | None = None):
    v = parse_variant(arg, **DEFAULTS)
    layers = [v["mixer"]] * v["layers"] if v["mixer"] else list(HYBRID)
    model = model_config(
        kind="causal_lm",
        vocab_size=v["vocab_size"],
        d_model=v["d_model"],
        layers=layers,
        mlp={"type": "swiglu", "expansion": 2.0},
        mixers={"attention": {"num_heads": 2}, "mamba2": {"headdim": 32, "d_state": 32}},
    )
    config = base_config(model=model)
    config.data.task = "copying"
    config.data.vocab_size = v["vocab_size"]
    config.data.seq_len = v["seq_len"]
    config.data.num_tokens = v["num_tokens"]
    config.data.num_eval_batches = 8
    config.train.num_steps = v["steps"]
    config.train.batch_size = v["batch_size"]
    config.train.eval_every = 500
    config.train.checkpoint_every = 500
    config.optimizer.lr = v["lr"]
    config.optimizer.warmup_steps = 100
    return config
