"""AdamW with warmup and decay to zero, global-norm clipping and a weight-decay mask.

``config.optimizer``:

- ``lr`` (peak), ``warmup_steps``: linear warmup from 0 to ``lr`` over the first updates;
- ``schedule``: ``"cosine"`` (half cosine from ``lr`` to 0 at ``num_steps``), ``"linear"``
  (straight line to 0 at ``num_steps``) or ``"constant"`` (``lr`` after warmup);
- ``weight_decay`` (decoupled, AdamW), applied only to matrices: parameters with at least two
  dimensions whose path names no norm or bias (norm scales, biases, Mamba's ``A_log``/``D``/
  ``dt_bias`` vectors are not decayed);
- ``b1``, ``b2``, ``eps``; ``clip_norm``: clip the global gradient norm to this (0: off).

The update at step ``s`` (1-based, the value stored in checkpoints) uses the learning rate of
``schedule(s - 1)``: optax's count is the number of updates already applied.
"""

from __future__ import annotations

import math

import jax
import optax

SCHEDULES = ("cosine", "linear", "constant")
NO_DECAY_NAMES = ("norm", "bias", "scale")


def learning_rate_schedule(opt, num_steps: int) -> optax.Schedule:
    """Warmup then ``opt.schedule`` decay; zero at ``num_steps``."""
    lr = float(opt.lr)
    warmup = int(opt.warmup_steps)
    decay_steps = max(num_steps - warmup, 1)
    if opt.schedule == "cosine":
        decay = optax.cosine_decay_schedule(lr, decay_steps, alpha=0.0)
    elif opt.schedule == "linear":
        decay = optax.linear_schedule(lr, 0.0, decay_steps)
    elif opt.schedule == "constant":
        decay = optax.constant_schedule(lr)
    else:
        raise ValueError(f"optimizer.schedule must be one of {SCHEDULES}, got {opt.schedule!r}")
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])


def _path_names(path) -> list[str]:
    names = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                names.append(str(getattr(key, attr)))
                break
    return names


def decay_mask(params):
    """True for parameters that get weight decay (see the module docstring)."""

    def one(path, x):
        names = [n.lower() for n in _path_names(path)]
        named_out = any(bad in n for n in names for bad in NO_DECAY_NAMES)
        return bool(x.ndim >= 2 and not named_out)

    return jax.tree_util.tree_map_with_path(one, params)


def make_optimizer(opt, num_steps: int) -> optax.GradientTransformation:
    """The optax chain of ``config.optimizer`` for a run of ``num_steps`` updates."""
    schedule = learning_rate_schedule(opt, num_steps)
    parts = []
    if float(opt.clip_norm) > 0:
        parts.append(optax.clip_by_global_norm(float(opt.clip_norm)))
    parts.append(
        optax.adamw(
            schedule,
            b1=float(opt.b1),
            b2=float(opt.b2),
            eps=float(opt.get("eps", 1e-8)),
            weight_decay=float(opt.weight_decay),
            mask=decay_mask,
        )
    )
    return optax.chain(*parts)


def validate(opt, num_steps: int) -> None:
    """ValueError naming the ``optimizer.*`` key with a bad value."""

    def number(key):
        value = opt.get(key, None)
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
        ):
            raise ValueError(f"optimizer.{key} must be a finite number, got {value!r}")
        return float(value)

    if number("lr") <= 0:
        raise ValueError(f"optimizer.lr must be > 0, got {opt.lr}")
    warmup = opt.get("warmup_steps", None)
    if not isinstance(warmup, int) or isinstance(warmup, bool) or warmup < 0:
        raise ValueError(f"optimizer.warmup_steps must be an integer >= 0, got {warmup!r}")
    if warmup > num_steps:
        raise ValueError(f"optimizer.warmup_steps={warmup} exceeds train.num_steps={num_steps}")
    if opt.get("schedule", None) not in SCHEDULES:
        raise ValueError(
            f"optimizer.schedule must be one of {SCHEDULES}, got {opt.get('schedule')!r}"
        )
    if number("weight_decay") < 0:
        raise ValueError(f"optimizer.weight_decay must be >= 0, got {opt.weight_decay}")
    for key in ("b1", "b2"):
        if not 0 <= number(key) < 1:
            raise ValueError(f"optimizer.{key} must be in [0, 1), got {opt[key]}")
    if number("clip_norm") < 0:
        raise ValueError(f"optimizer.clip_norm must be >= 0 (0: no clipping), got {opt.clip_norm}")
    if "eps" in opt and number("eps") <= 0:
        raise ValueError(f"optimizer.eps must be > 0, got {opt.eps}")
