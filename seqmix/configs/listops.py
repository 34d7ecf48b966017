"""ListOps (Long Range Arena): classify the value 0-9 of a nested MIN/MAX/MED/SUM_MOD expression.

    seqmix-train --config=listops   # or: python -m seqmix.experiments.train --config=listops

Expressions follow LRA's generator (max depth 10, up to 10 arguments, 500 < length < 2000
tokens); the model is the bidirectional ``SequenceClassifier`` (mean-pooled over the tokens,
padding excluded). Workdir ~/seqmix-runs/listops. This is the LRA setting and is long on a
CPU; ``--config=listops:max_length=200,min_length=20`` is a quick variant. Arguments: ``mixer``
(default a mamba2 + attention hybrid), ``layers``, ``d_model``, ``max_length``, ``min_length``,
``max_depth``, ``max_args``, ``steps``, ``batch_size``, ``lr``.
"""

from seqmix.models import model_config
from seqmix.train.config import base_config, parse_variant

DEFAULTS = dict(
    mixer="",
    layers=4,
    d_model=128,
    max_length=2000,
    min_length=500,
    max_depth=10,
    max_args=10,
    steps=5000,
    batch_size=32,
    lr=1e-3,
)
HYBRID = ["mamba2", "attention", "mamba2", "attention"]


def get_config(arg: str | None = None):
    v = parse_variant(arg, **DEFAULTS)
    layers = [v["mixer"]] * v["layers"] if v["mixer"] else list(HYBRID)
    model = model_config(
        kind="classifier",
        vocab_size=16,
        num_classes=10,
        pad_id=0,
        d_model=v["d_model"],
        layers=layers,
        mlp={"type": "swiglu", "expansion": 2.0},
        mixers={"attention": {"num_heads": 4}, "mamba2": {"headdim": 32, "d_state": 32}},
    )
    config = base_config(model=model)
    config.data.task = "listops"
    config.data.seq_len = v["max_length"]
    config.data.max_length = v["max_length"]
    config.data.min_length = v["min_length"]
    config.data.max_depth = v["max_depth"]
    config.data.max_args = v["max_args"]
    config.data.num_eval_batches = 16
    config.train.num_steps = v["steps"]
    config.train.batch_size = v["batch_size"]
    config.train.eval_every = 500
    config.train.checkpoint_every = 500
    config.optimizer.lr = v["lr"]
    config.optimizer.warmup_steps = 500
    config.optimizer.weight_decay = 0.05
    return config
