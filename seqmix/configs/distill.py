"""Distils a trained attention LM into a hybrid: attention transfer, then end to end.

    python -m seqmix.experiments.distill --config=distill \\
        --config.distill.teacher=~/seqmix-runs/lm_bytes-mixer=attention

(``seqmix-distill`` is the same launcher.) The teacher is a seqmix run directory of a
trained causal LM (its newest checkpoint) or a local Hugging Face checkpoint directory
(``config.json`` and safetensors); the data is the byte-level corpus of ``lm_bytes``, so a
seqmix teacher is typically trained first with

    seqmix-train --config=lm_bytes:mixer=attention --workdir=~/seqmix-runs/lm_bytes-mixer=attention

Arguments (``--config=distill:key=value,...``): ``mixer`` (the target: mamba2, gla,
linear_attention), ``layers`` (the replaced layers joined by ``+``, default ``1+2+3``: 3 of
4), ``transfer_steps`` and ``e2e_steps`` (the two stages' lengths), ``progressive`` (true:
the layers are replaced one at a time in the order given, each with a transfer and an
end-to-end stage; the step counts are split evenly over them), ``temperature``,
``ce_weight``, ``train_mlps``, ``init`` (``attention``, or ``random``: the ablation with the
new mixers drawn from the seed), ``seq_len``, ``batch_size``, ``lr``, ``data_dir``. Every
key is also a ``--config.<key>=<value>`` override; ``--config.distill.stages`` takes the
schedule itself (``"transfer:3:100;e2e:3:100;transfer:2+3:100;e2e:2+3:200"``), and
``train.num_steps`` is the stages' total (left unset here, set by the launcher).

The CPU comparison of teacher, distilled students (mamba2 and gla), the hybrid from
scratch and the random-init ablation runs, per student, as

    python -m seqmix.experiments.distill --config=distill:mixer=gla \\
        --config.distill.teacher=~/seqmix-runs/lm_bytes-mixer=attention \\
        --workdir=~/seqmix-runs/distill-gla
    python -m seqmix.experiments.distill --config=distill:mixer=gla,init=random \\
        --config.distill.teacher=~/seqmix-runs/lm_bytes-mixer=attention \\
        --workdir=~/seqmix-runs/distill-gla-random
    seqmix-train --config=lm_bytes --config.model.layers=AGGG --config.train.num_steps=2000 \\
        --config.model.mixers.gla.num_heads=4 --workdir=~/seqmix-runs/scratch-gla

(the hybrid from scratch, as many steps as the two stages; its GLA layers take
``lm_bytes``'s mixer keys where the conversion fixes others, e.g. the identity feature map:
the student's exact model config is in the distill workdir's ``config.json``). Each run's
``metrics.jsonl`` has the held-out ``bits_per_byte``, ``kl`` and ``align_layer<i>`` per
evaluation (see ``seqmix.train.distill``).
"""

from ml_collections.config_dict import placeholder

from seqmix.train import distill
from seqmix.train.config import base_config, parse_variant

DEFAULTS = dict(
    mixer="mamba2",
    layers="1+2+3",
    transfer_steps=500,
    e2e_steps=1500,
    progressive=False,
    temperature=2.0,
    ce_weight=0.0,
    train_mlps=False,
    init="attention",
    seq_len=256,
    batch_size=32,
    lr=1e-3,
    data_dir="",
)


def stages_for(layers: str, transfer_steps: int, e2e_steps: int, progressive: bool) -> str:
    """The ``distill.stages`` string: ``transfer`` then ``e2e`` over ``layers`` (a ``+``
    list); progressive: one such pair per layer added, in the order given."""
    order = [x.strip() for x in layers.split("+") if x.strip()]
    if not progressive:
        return f"transfer:{'+'.join(order)}:{transfer_steps};e2e:{'+'.join(order)}:{e2e_steps}"
    n = len(order)
    stages = []
    for k in range(1, n + 1):
        active = "+".join(sorted(order[:k], key=int))
        t = transfer_steps // n + (1 if k <= transfer_steps % n else 0)
        e = e2e_steps // n + (1 if k <= e2e_steps % n else 0)
        stages += [f"transfer:{active}:{t}", f"e2e:{active}:{e}"]
    return ";".join(stages)


def get_config(arg: str | None = None):
    v = parse_variant(arg, **DEFAULTS)
    config = base_config()  # model: left empty, the launcher sets the converted student's
    config.data.task = "bytes"
    config.data.seq_len = v["seq_len"]
    config.data.data_dir = v["data_dir"]  # "": $SEQMIX_DATA_DIR or ~/.cache/seqmix
    config.data.val_fraction = 0.05
    config.data.num_eval_batches = 16
    config.train.num_steps = placeholder(int)  # the stages' total
    config.train.batch_size = v["batch_size"]
    config.train.eval_every = 250
    config.train.checkpoint_every = 250
    config.optimizer.lr = v["lr"]
    config.optimizer.warmup_steps = 50
    config.distill = distill.defaults()
    config.distill.mixer = v["mixer"]
    config.distill.stages = stages_for(
        v["layers"], v["transfer_steps"], v["e2e_steps"], v["progressive"]
    )
    config.distill.temperature = v["temperature"]
    config.distill.ce_weight = v["ce_weight"]
    config.distill.train_mlps = v["train_mlps"]
    config.distill.init = v["init"]
    return config
