"""The keys every experiment config has, and their validation.

``base_config(model=..., data=...)`` returns the shared skeleton with defaults:

- ``seed`` (int): model initialisation, data and dropout all derive from it.
- ``model``: a ``seqmix.models.model_config(...)`` ConfigDict.
- ``data``: ``task`` (a name in ``seqmix.data.TASKS``) plus the task's own keys.
- ``train``: ``num_steps``, ``batch_size`` (global, over all devices), ``eval_batch_size``
  (None: the batch size), ``eval_every``/``checkpoint_every`` (steps; 0: only at the end),
  ``keep`` (the last K checkpoints; the best by the evaluation metric is kept as well),
  ``log_every``, ``compute_dtype`` (None: the model's ``dtype``; ``"bfloat16"`` computes in
  bf16 with float32 parameters), ``async_checkpoints``, ``init_on_host`` (initialise the
  parameters on the host CPU, then copy them to the devices), ``data_processes`` (0: the
  next batch is made in a thread; n: n spawned processes make the next n batches).
- ``optimizer``: ``lr``, ``warmup_steps``, ``schedule`` ("cosine" | "linear" | "constant"),
  ``weight_decay``, ``b1``, ``b2``, ``eps``, ``clip_norm`` (see ``seqmix.train.optimizer``).
- ``mesh``: ``data`` (-1: every device not used by fsdp and seq), ``fsdp``, ``seq`` (devices
  that split one sequence: context parallelism; the sequence length must divide by it).

``validate`` raises a ValueError naming the offending key before anything is compiled.
"""

from __future__ import annotations

import ml_collections
from ml_collections.config_dict import placeholder

from seqmix.train import optimizer as optimizer_lib

TOP_LEVEL = ("seed", "model", "data", "train", "optimizer", "mesh")
COMPUTE_DTYPES = (None, "float32", "bfloat16", "float16")


def base_config(*, model=None, data=None) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.model = model if model is not None else ml_collections.ConfigDict()
    config.data = data if data is not None else ml_collections.ConfigDict()
    # Typed placeholders (None by default) so that --config.train.compute_dtype=bfloat16 works.
    config.train = ml_collections.ConfigDict(
        dict(
            num_steps=1000,
            batch_size=64,
            eval_batch_size=placeholder(int),
            eval_every=250,
            checkpoint_every=250,
            keep=3,
            log_every=50,
            compute_dtype=placeholder(str),
            async_checkpoints=True,
            init_on_host=True,
            # 0: the next batch is made in a thread; n > 0: n processes make the next n
            # (jobs sharing one process then do not share the interpreter lock for data)
            data_processes=0,
        )
    )
    config.optimizer = ml_collections.ConfigDict(
        dict(
            lr=1e-3,
            warmup_steps=100,
            schedule="cosine",
            weight_decay=0.1,
            b1=0.9,
            b2=0.98,
            eps=1e-8,
            clip_norm=1.0,
        )
    )
    config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, seq=1))
    return config


def _int(section, key: str, *, minimum: int, name: str | None = None) -> int:
    value = section.get(key, None)
    full = name or key
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{full} must be an integer >= {minimum}, got {value!r}")
    return value


def validate(config, *, task=None, num_devices: int | None = None) -> None:
    """ValueError naming the key of the first bad value (structure, ranges, the mixers, the
    batch against the devices, the model against the task)."""
    for key in TOP_LEVEL:
        if key not in config:
            raise ValueError(f"config has no {key!r}; every experiment needs {TOP_LEVEL}")
    if not isinstance(config.seed, int) or isinstance(config.seed, bool) or config.seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {config.seed!r}")
    train = config.train
    num_steps = _int(train, "num_steps", minimum=1, name="train.num_steps")
    batch_size = _int(train, "batch_size", minimum=1, name="train.batch_size")
    eval_batch_size = train.get("eval_batch_size", None) or batch_size
    _int(
        ml_collections.ConfigDict({"v": eval_batch_size}),
        "v",
        minimum=1,
        name="train.eval_batch_size",
    )
    for key in ("eval_every", "checkpoint_every"):
        _int(train, key, minimum=0, name=f"train.{key}")
    if train.get("data_processes", None) is not None:
        _int(train, "data_processes", minimum=0, name="train.data_processes")
    _int(train, "keep", minimum=1, name="train.keep")
    _int(train, "log_every", minimum=1, name="train.log_every")
    if train.get("compute_dtype", None) not in COMPUTE_DTYPES:
        raise ValueError(
            f"train.compute_dtype must be one of {COMPUTE_DTYPES}, got {train.compute_dtype!r}"
        )
    optimizer_lib.validate(config.optimizer, num_steps)

    if num_devices is not None:
        from seqmix.train import sharding  # local: keeps this module free of device state

        data, fsdp, seq = sharding.mesh_dims(config.mesh, num_devices)
        seq_len = getattr(task, "seq_len", None)
        if seq_len is not None and seq_len % seq:
            raise ValueError(
                f"mesh.seq={seq} does not divide the sequence length {seq_len} of "
                f"data.task={task.name!r}"
            )
        for key, size in (
            ("train.batch_size", batch_size),
            ("train.eval_batch_size", eval_batch_size),
        ):
            if size % (data * fsdp):
                raise ValueError(
                    f"{key}={size} is not divisible by the {data * fsdp} data-parallel devices "
                    f"(mesh.data={data} x mesh.fsdp={fsdp})"
                )

    from seqmix.models.config import layer_names  # local: the registry imports the layers

    try:
        layer_names(config.model)
    except (ValueError, AttributeError, KeyError) as e:
        raise ValueError(
            f"model.{e}" if str(e).startswith("layers") else f"model.layers: {e}"
        ) from None
    if task is not None:
        kind = config.model.get("kind", None)
        if kind != task.kind:
            raise ValueError(
                f"model.kind={kind!r} but data.task={task.name!r} trains a {task.kind!r} model"
            )
        if config.model.get("vocab_size", 0) < task.vocab_size:
            raise ValueError(
                f"model.vocab_size={config.model.get('vocab_size')} is smaller "
                f"than the {task.vocab_size} tokens of data.task={task.name!r}"
            )
        if task.num_classes is not None and config.model.get("num_classes") != task.num_classes:
            raise ValueError(
                f"model.num_classes={config.model.get('num_classes')} but "
                f"data.task={task.name!r} has {task.num_classes} classes"
            )


def parse_variant(arg: str | None, **defaults) -> dict:
    """The variant argument of a config file (``seqmix/configs/x.py:key=value,key=value``) merged
    into ``defaults``; each value takes the type of its default (ValueError for an unknown
    key or a bad value)."""
    values = dict(defaults)
    if not arg:
        return values
    for item in arg.split(","):
        if not item.strip():
            continue
        if "=" not in item:
            raise ValueError(
                f"config argument {item!r} must look like key=value (known keys: "
                f"{sorted(defaults)})"
            )
        key, raw = (s.strip() for s in item.split("=", 1))
        if key not in defaults:
            raise ValueError(f"unknown config argument {key!r}; known: {sorted(defaults)}")
        default = defaults[key]
        try:
            if isinstance(default, bool):
                if raw.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(raw)
                values[key] = raw.lower() in ("true", "1")
            elif isinstance(default, int):
                values[key] = int(raw)
            elif isinstance(default, float):
                values[key] = float(raw)
            else:
                values[key] = raw
        except ValueError:
            raise ValueError(
                f"config argument {key}={raw!r}: expected a {type(default).__name__}"
            ) from None
    return values
