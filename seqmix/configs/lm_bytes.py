"""Byte-level language modelling on the Python standard library's source; reports bits per byte.

    seqmix-train --config=lm_bytes  # or: python -m seqmix.experiments.train --config=lm_bytes

The corpus (the stdlib's ``.py`` files, split into train/validation by a hash of each path)
is written once to ``$SEQMIX_DATA_DIR`` (default ``~/.cache/seqmix``) and read through
``np.memmap``. Workdir ~/seqmix-runs/lm_bytes. Arguments: ``mixer`` (default the hybrid
``MMMA`` repeated over ``layers``: three mamba2 layers, then attention), ``layers``,
``d_model``, ``seq_len``, ``steps``, ``batch_size``, ``lr``, ``data_dir``, e.g.
``--config=lm_bytes:mixer=gla,d_model=256``. One token is one byte: ``seqmix.data.bytes``
has ``encode``/``decode``, and ``seqmix-generate --workdir=...`` prints generated text.
"""

from seqmix.models import model_config
from seqmix.train.config import base_config, parse_variant

DEFAULTS = dict(
    mixer="", layers=4, d_model=128, seq_len=256, steps=5000, batch_size=32, lr=2e-3, data_dir=""
)
HYBRID = "MMMA"  # repeated to the number of layers


def get_config(arg: str | None = None):
    v = parse_variant(arg, **DEFAULTS)
    n = v["layers"]
    layers = [v["mixer"]] * n if v["mixer"] else (HYBRID * n)[:n]
    model = model_config(
        kind="causal_lm",
        vocab_size=256,
        d_model=v["d_model"],
        layers=layers,
        mlp={"type": "swiglu", "expansion": 4.0},
        mixers={"attention": {"num_heads": 4}, "mamba2": {"headdim": 32, "d_state": 64}},
    )
    config = base_config(model=model)
    config.data.task = "bytes"
    config.data.seq_len = v["seq_len"]
    config.data.data_dir = v["data_dir"]  # "": $SEQMIX_DATA_DIR or ~/.cache/seqmix
    config.data.val_fraction = 0.05
    config.data.num_eval_batches = 16
    config.train.num_steps = v["steps"]
    config.train.batch_size = v["batch_size"]
    config.train.eval_every = 500
    config.train.checkpoint_every = 500
    config.optimizer.lr = v["lr"]
    config.optimizer.warmup_steps = 200
    return config
