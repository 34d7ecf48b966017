"""The ``distill`` section of a distillation config: its defaults, the stage schedule
(``"<kind>:<layers>:<steps>;..."``) and its validation (see ``seqmix.train.distill``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import ml_collections

KINDS = ("transfer", "e2e")
INITS = ("attention", "random")
FORMATS = ("auto", "seqmix", "hf")


def defaults() -> ml_collections.ConfigDict:
    """The ``config.distill`` section with its defaults (the teacher must be set)."""
    return ml_collections.ConfigDict(
        dict(
            teacher="",
            teacher_format="auto",
            mixer="mamba2",
            mixer_overrides=None,
            decay_half_lives=(16.0, 4096.0),
            init="attention",
            stages="transfer:1+2+3:100;e2e:1+2+3:200",
            temperature=2.0,
            kl_weight=1.0,
            ce_weight=0.0,
            train_mlps=False,
        )
    )


@dataclasses.dataclass(frozen=True)
class Stage:
    """Steps ``first .. last`` (1-based, inclusive) train ``kind`` with ``layers`` replaced."""

    index: int
    kind: str
    layers: tuple[int, ...]
    first: int
    last: int

    @property
    def steps(self) -> int:
        return self.last - self.first + 1


def parse_stages(spec: str, *, offset: int = 0) -> tuple[Stage, ...]:
    """The stages of ``"<kind>:<layers>:<steps>;..."`` (layers joined by ``+``), numbered
    from step ``offset + 1``."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(
            f"distill.stages must be a string like 'transfer:1+2+3:100;e2e:1+2+3:200', got {spec!r}"
        )
    stages, first = [], int(offset) + 1
    for k, item in enumerate(p.strip() for p in spec.split(";") if p.strip()):
        fields = item.split(":")
        if len(fields) != 3:
            raise ValueError(
                f"distill.stages: stage {item!r} must be <kind>:<layers>:<steps> (e.g. "
                "'transfer:1+2+3:100')"
            )
        kind, layers, steps = (f.strip() for f in fields)
        if kind not in KINDS:
            raise ValueError(f"distill.stages: stage {item!r} has kind {kind!r}; expected {KINDS}")
        try:
            indices = tuple(int(x) for x in layers.split("+"))
            n = int(steps)
        except ValueError:
            raise ValueError(
                f"distill.stages: stage {item!r} needs integer layers joined by '+' and an "
                "integer number of steps"
            ) from None
        if n < 1 or min(indices) < 0 or len(set(indices)) != len(indices):
            raise ValueError(
                f"distill.stages: stage {item!r} needs distinct layer indices >= 0 and steps >= 1"
            )
        stages.append(Stage(k, kind, tuple(sorted(indices)), first, first + n - 1))
        first += n
    return tuple(stages)


@dataclasses.dataclass(frozen=True)
class Settings:
    """``config.distill`` checked (see the module docstring)."""

    teacher: str
    teacher_format: str
    mixer: str
    mixer_overrides: dict | None
    decay_half_lives: tuple[float, float]
    init: str
    stages: tuple[Stage, ...]
    temperature: float
    kl_weight: float
    ce_weight: float
    train_mlps: bool

    @property
    def plan(self) -> tuple[int, ...]:
        """Every layer some stage replaces: the layers the student converts."""
        return tuple(sorted({i for s in self.stages for i in s.layers}))

    @property
    def num_steps(self) -> int:
        return sum(s.steps for s in self.stages)


def settings_of(config, *, offset: int = 0) -> Settings:
    """``config.distill`` as ``Settings``; ValueError naming the ``distill.*`` key."""
    if "distill" not in config:
        raise ValueError("config has no distill section (seqmix.train.distill.defaults())")
    d = config.distill
    known = set(defaults().keys())
    unknown = sorted(set(d.keys()) - known)
    if unknown:
        raise ValueError(f"distill has unknown keys {unknown}; known: {sorted(known)}")

    def number(key, *, minimum=0.0, strict=False):
        value = d.get(key, defaults()[key])
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"distill.{key} must be a number, got {value!r}")
        if value < minimum or (strict and value == minimum):
            op = ">" if strict else ">="
            raise ValueError(f"distill.{key} must be {op} {minimum}, got {value!r}")
        return float(value)

    fmt = d.get("teacher_format", "auto")
    if fmt not in FORMATS:
        raise ValueError(f"distill.teacher_format must be one of {FORMATS}, got {fmt!r}")
    init = d.get("init", "attention")
    if init not in INITS:
        raise ValueError(f"distill.init must be one of {INITS}, got {init!r}")
    overrides = d.get("mixer_overrides", None)
    if overrides is not None and not isinstance(overrides, (Mapping, ml_collections.ConfigDict)):
        raise ValueError(
            f"distill.mixer_overrides must be a mapping of mixer config keys or None, got "
            f"{overrides!r}"
        )
    if isinstance(overrides, ml_collections.ConfigDict):
        overrides = overrides.to_dict()
    lives = tuple(float(x) for x in d.get("decay_half_lives", (16.0, 4096.0)))
    if len(lives) != 2 or not 0 < lives[0] <= lives[1]:
        raise ValueError(
            f"distill.decay_half_lives must be (shortest, longest) > 0 tokens, got {lives}"
        )
    train_mlps = d.get("train_mlps", False)
    if not isinstance(train_mlps, bool):
        raise ValueError(f"distill.train_mlps must be true or false, got {train_mlps!r}")
    settings = Settings(
        teacher=str(d.get("teacher", "")),
        teacher_format=fmt,
        mixer=str(d.get("mixer", "mamba2")),
        mixer_overrides=dict(overrides) if overrides else None,
        decay_half_lives=lives,
        init=init,
        stages=parse_stages(d.get("stages", None), offset=offset),
        temperature=number("temperature", strict=True),
        kl_weight=number("kl_weight"),
        ce_weight=number("ce_weight"),
        train_mlps=train_mlps,
    )
    if (
        settings.kl_weight == 0
        and settings.ce_weight == 0
        and any(s.kind == "e2e" for s in settings.stages)
    ):
        raise ValueError("distill.kl_weight and distill.ce_weight are both 0: e2e has no loss")
    return settings
