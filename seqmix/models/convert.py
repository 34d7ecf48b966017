"""Converting attention layers of a causal LM into other mixers, initialised from the
attention's own weights (The Mamba in the Llama's mapping, generalised by a table).

The mapping (``CONVERSIONS``, one entry per target mixer): the teacher layer's projections
``W_q -> C / q``, ``W_k -> B / k``, ``W_v -> x / v``, ``W_o -> out`` (with their biases),
key/value heads repeated to the query heads where the mixer has no grouped keys (head
``h`` reads key/value head ``h // (H / H_kv)``), ``head_dim`` kept. The mixer's own
parameters start where the layer is the causal linear attention of the teacher's q, k, v
projections with a decay close to 1:

- ``linear_attention``: q/k/v/o copied; ``scale = head_dim^-0.5`` (the teacher's); the
  mixer's feature map and normalisation are its config's (``elu1``, normalised, unless
  overridden; ``feature_map="identity", normalize=False`` is plain linear attention); a
  short conv, when an override turns it on, starts as identity taps (then its silu).
- ``gla``: as above with the identity feature map; the gate's up-projection starts at
  zero and its bias at ``logit(exp(g_h * gate_normalizer))``, so that every channel of
  head ``h`` starts with log decay ``g_h`` (``initial_log_decay``: half-lives log-spaced
  over ``decay_half_lives``, 16 to 4096 tokens by default), whatever the input; the
  down-projection keeps its random start so that the gate learns from the first step. The
  output norm and the output gate are off by default (``output_norm=False``,
  ``output_gate=False``: a silu gate cannot start open without a bias); overriding them
  on gives a norm of ones and a randomly initialised gate.
- ``mamba2``: ``x, B, C`` from ``v, k, q`` with ``ngroups = num_heads``, ``d_state =
  headdim = head_dim``, ``expand = num_heads * head_dim / d_model``; the conv starts as
  the identity (last tap 1, other taps and bias 0) and is linear (``conv_activation=None``);
  ``D = 0``; the dt projection starts at zero and ``dt_bias = softplus^-1(head_dim^-0.5)``,
  so ``dt`` carries the attention scale (SSD uses scale 1 and ``v = x dt``); ``A_log`` gives
  ``A dt = g_h``; no z gate and norm by default (``gated_norm=False``; overriding it on
  gives a random z projection and a norm of ones).

Not carried over: RoPE (the linear mixers see no positions but their decay), Qwen3's q/k
norm, and a sliding window. With the decay held at 1 (and the identity feature map) each
converted layer computes ``o_proj(linear_attention(q, k, v, scale=head_dim^-0.5))`` of the
teacher's own projections exactly (tests/models/test_convert.py).

A new target mixer is one more ``CONVERSIONS`` entry: the keys its config takes from the
teacher, its conversion defaults, and the function that writes its parameters.

    from seqmix.models.convert import convert, least_important, new_parameters
    from seqmix.models.layerwise import layer_importance
    student = convert(teacher, config, [1, 2, 3], "mamba2")       # explicit layers
    student = convert(teacher, config, "AMMM")                      # a pattern (legend)
    scores = layer_importance(teacher, config, tokens, "mamba2")    # KL per layer alone
    student = convert(teacher, config, least_important(scores, 3), "mamba2")
    student.model, student.config, student.replaced                 # {index: mixer name}
    nnx.state(student.model, new_parameters(student.replaced))      # the new mixers' params
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from seqmix.layers import Attention, copy_config
from seqmix.models.builder import model_from_params, model_params
from seqmix.models.causal_lm import CausalLM
from seqmix.models.config import layer_names
from seqmix.models.registry import build_mixer, mixer_class

DEFAULT_HALF_LIVES = (16.0, 4096.0)


@dataclasses.dataclass(frozen=True)
class AttentionWeights:
    """An attention layer's projections per head, float32 numpy.

    ``wq [d, H, D]``, ``wk``/``wv [d, Hkv, D]``, ``wo [H, D, d]``; biases ``bq [H, D]``,
    ``bk``/``bv [Hkv, D]``, ``bo [d]`` or None; ``scale`` (``D^-0.5``).
    """

    wq: np.ndarray
    wk: np.ndarray
    wv: np.ndarray
    wo: np.ndarray
    bq: np.ndarray | None
    bk: np.ndarray | None
    bv: np.ndarray | None
    bo: np.ndarray | None
    scale: float

    @property
    def num_heads(self) -> int:
        return self.wq.shape[1]

    @property
    def head_dim(self) -> int:
        return self.wq.shape[2]

    @property
    def d_model(self) -> int:
        return self.wq.shape[0]

    @property
    def has_bias(self) -> bool:
        return any(b is not None for b in (self.bq, self.bk, self.bv, self.bo))

    def expanded(self) -> AttentionWeights:
        """The same layer with key/value heads repeated to ``num_heads`` (query head ``h``
        reads key/value head ``h // (H / Hkv)``, as grouped-query attention does)."""
        groups = self.num_heads // self.wk.shape[1]

        def rep(x, axis):
            return None if x is None else np.repeat(x, groups, axis=axis)

        return dataclasses.replace(
            self, wk=rep(self.wk, 1), wv=rep(self.wv, 1), bk=rep(self.bk, 0), bv=rep(self.bv, 0)
        )

    def biases(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``bq, bk, bv`` as ``[H, D]``-shaped arrays (zeros where absent) and ``bo [d]``."""
        zeros = np.zeros_like(self.wq[0])
        kv = np.zeros_like(self.wk[0])
        return (
            zeros if self.bq is None else self.bq,
            kv if self.bk is None else self.bk,
            kv if self.bv is None else self.bv,
            np.zeros(self.d_model, np.float32) if self.bo is None else self.bo,
        )


def attention_weights(layer: Attention) -> AttentionWeights:
    """The projections of a seqmix ``Attention`` layer (see ``AttentionWeights``)."""
    if not isinstance(layer, Attention) or layer.o_proj is None:
        raise ValueError(
            f"layer must be a seqmix Attention mixer with an output projection, got "
            f"{type(layer).__name__}"
        )
    H, Hkv, D, d = layer.num_heads, layer.num_kv_heads, layer.head_dim, layer.d_model

    def get(dense, kind, shape):
        value = getattr(dense, kind)
        return None if value is None else np.asarray(value[...], np.float32).reshape(shape)

    return AttentionWeights(
        wq=get(layer.q_proj, "kernel", (d, H, D)),
        wk=get(layer.k_proj, "kernel", (d, Hkv, D)),
        wv=get(layer.v_proj, "kernel", (d, Hkv, D)),
        wo=get(layer.o_proj, "kernel", (H, D, d)),
        bq=get(layer.q_proj, "bias", (H, D)),
        bk=get(layer.k_proj, "bias", (Hkv, D)),
        bv=get(layer.v_proj, "bias", (Hkv, D)),
        bo=get(layer.o_proj, "bias", (d,)),
        scale=float(layer.scale),
    )


def initial_log_decay(num_heads: int, half_lives=DEFAULT_HALF_LIVES) -> np.ndarray:
    """Per-head log decay ``g_h = log(1/2) / t_h`` with half-lives ``t_h`` (tokens)
    log-spaced from ``half_lives[0]`` (head 0) to ``half_lives[1]``; float32 ``[H]``."""
    lo, hi = (float(t) for t in half_lives)
    if not 1.0 <= lo <= hi:
        raise ValueError(f"decay_half_lives must satisfy 1 <= low <= high, got {half_lives!r}")
    t = np.geomspace(lo, hi, num_heads) if num_heads > 1 else np.array([hi])
    return (math.log(0.5) / t).astype(np.float32)


def _set(param, value) -> None:
    want = param[...]
    value = np.asarray(value, np.float32).reshape(want.shape)
    param[...] = jnp.asarray(value, want.dtype)


def _cols(w: np.ndarray) -> np.ndarray:
    """``[d, H, D]`` -> ``[d, H * D]``."""
    return w.reshape(w.shape[0], -1)


def _identity_conv(conv) -> None:
    weight = np.zeros(conv.weight[...].shape, np.float32)
    weight[-1] = 1.0
    _set(conv.weight, weight)
    if conv.bias is not None:
        _set(conv.bias, np.zeros(conv.bias[...].shape))


# ---------------------------------------------------------------- linear attention, GLA


def _linear_attention_keys(w: AttentionWeights, d_model: int) -> dict[str, Any]:
    del d_model
    return {
        "num_heads": w.num_heads,
        "head_dim": w.head_dim,
        "key_dim": w.head_dim,
        "use_bias": w.has_bias,
    }


def _init_linear_attention(mixer, w: AttentionWeights, half_lives) -> None:
    w = w.expanded()
    _set(mixer.q_proj.kernel, _cols(w.wq))
    _set(mixer.k_proj.kernel, _cols(w.wk))
    _set(mixer.v_proj.kernel, _cols(w.wv))
    _set(mixer.o_proj.kernel, w.wo.reshape(-1, w.d_model))
    if mixer.q_proj.bias is not None:
        bq, bk, bv, bo = w.biases()
        for dense, b in ((mixer.q_proj, bq), (mixer.k_proj, bk), (mixer.v_proj, bv)):
            _set(dense.bias, b.reshape(-1))
        _set(mixer.o_proj.bias, bo)
    if mixer.conv is not None:
        _identity_conv(mixer.conv)
    if mixer.decay == "data":
        g = initial_log_decay(mixer.num_heads, half_lives).astype(np.float64)
        p = np.exp(g * mixer.gate_normalizer)  # sigmoid(bias) = exp(g * normalizer)
        bias = np.log(p) - np.log1p(-p)
        _set(mixer.gate_up.kernel, np.zeros(mixer.gate_up.kernel[...].shape))
        _set(mixer.gate_up.bias, np.repeat(bias, mixer.feature_dim))


# ---------------------------------------------------------------- Mamba-2


def _mamba2_keys(w: AttentionWeights, d_model: int) -> dict[str, Any]:
    inner = w.num_heads * w.head_dim
    if inner % d_model:
        raise ValueError(
            f"mamba2: num_heads * head_dim ({inner}) must be a multiple of d_model "
            f"({d_model}) (Mamba-2's d_inner is expand * d_model)"
        )
    return {
        "expand": inner // d_model,
        "headdim": w.head_dim,
        "ngroups": w.num_heads,
        "d_state": w.head_dim,
        "use_bias": w.has_bias,
    }


def _init_mamba2(mixer, w: AttentionWeights, half_lives) -> None:
    w = w.expanded()
    H = mixer.num_heads
    z = mixer.d_inner if mixer.gated_norm else 0
    kernel = np.array(mixer.in_proj.kernel[...], np.float32)
    xbc = [_cols(w.wv), _cols(w.wk), _cols(w.wq)]  # x <- v, B <- k, C <- q
    kernel[:, z:] = np.concatenate(xbc + [np.zeros((w.d_model, H), np.float32)], axis=1)
    _set(mixer.in_proj.kernel, kernel)
    if mixer.in_proj.bias is not None:
        bq, bk, bv, bo = w.biases()
        bias = np.zeros(kernel.shape[1], np.float32)
        bias[z : z + 3 * mixer.d_inner] = np.concatenate(
            [bv.reshape(-1), bk.reshape(-1), bq.reshape(-1)]
        )
        _set(mixer.in_proj.bias, bias)
        _set(mixer.out_proj.bias, bo)
    _set(mixer.out_proj.kernel, w.wo.reshape(-1, w.d_model))
    _identity_conv(mixer.conv)
    dt = np.float64(w.scale)
    _set(mixer.dt_bias, np.full((H,), dt + np.log(-np.expm1(-dt))))  # softplus^-1(scale)
    g = initial_log_decay(H, half_lives).astype(np.float64)
    _set(mixer.A_log, np.log(-g / dt))  # A dt = -exp(A_log) dt = g
    _set(mixer.D, np.zeros((H,)))


@dataclasses.dataclass(frozen=True)
class Conversion:
    """How an attention layer becomes one target mixer.

    ``keys(weights, d_model)``: the mixer config keys fixed by the teacher (sizes, biases);
    ``defaults``: the conversion's starting choices (a user's ``mixers`` overrides them);
    ``init(mixer, weights, decay_half_lives)``: writes the mixer's parameters in place.
    """

    keys: Callable[[AttentionWeights, int], dict[str, Any]]
    defaults: Mapping[str, Any]
    init: Callable[[nnx.Module, AttentionWeights, tuple[float, float]], None]


CONVERSIONS: dict[str, Conversion] = {
    "linear_attention": Conversion(_linear_attention_keys, {}, _init_linear_attention),
    "gla": Conversion(
        _linear_attention_keys,
        {"output_norm": False, "output_gate": False},
        _init_linear_attention,
    ),
    "mamba2": Conversion(
        _mamba2_keys, {"conv_activation": None, "gated_norm": False}, _init_mamba2
    ),
}


def conversion(name: str) -> Conversion:
    """``CONVERSIONS[name]``, or a ValueError listing the convertible mixers."""
    mixer_class(name)  # unknown mixer names get the registry's message
    if name not in CONVERSIONS:
        raise ValueError(
            f"mixer {name!r} has no conversion from attention; convertible: {sorted(CONVERSIONS)}"
        )
    return CONVERSIONS[name]


def mixer_section(
    weights: AttentionWeights, name: str, d_model: int, overrides: Mapping | None = None
) -> dict[str, Any]:
    """The ``config.mixers.<name>`` section of a converted layer: the mixer's defaults, the
    conversion's defaults, ``overrides``, then the keys fixed by the teacher (an override
    that contradicts one raises ValueError naming it)."""
    conv = conversion(name)
    section = mixer_class(name).default_config().to_dict()
    section.update(conv.defaults)
    overrides = dict(copy_config(overrides or {}).to_dict())
    unknown = sorted(set(overrides) - set(section) - {"implementation"})
    if unknown:
        raise ValueError(f"mixers.{name}: unknown keys {unknown}; known: {sorted(section)}")
    section.update(overrides)
    fixed = conv.keys(weights, d_model)
    for key, value in fixed.items():
        if key in overrides and overrides[key] != value:
            raise ValueError(
                f"mixers.{name}.{key}={overrides[key]!r} contradicts the teacher layer, which "
                f"fixes it to {value!r}"
            )
    section.update(fixed)
    return section


def convert_layer(
    attention: Attention,
    name: str,
    config,
    *,
    overrides: Mapping | None = None,
    decay_half_lives=DEFAULT_HALF_LIVES,
    rngs: nnx.Rngs | None = None,
) -> nnx.Module:
    """The mixer ``name`` initialised from one attention layer (see the module docstring).

    ``config`` is the teacher's model config (``d_model``, ``dtype``, ``norm_eps``,
    ``implementation``); ``overrides`` are keys of ``config.mixers.<name>``; parameters
    the mapping does not set are drawn from ``rngs`` (default ``nnx.Rngs(0)``).
    """
    weights = attention_weights(attention)
    cfg = copy_config(config)
    cfg.mixers[name] = mixer_section(weights, name, int(config.d_model), overrides)
    mixer = build_mixer(name, cfg, causal=True, rngs=rngs or nnx.Rngs(0))
    conversion(name).init(mixer, weights, tuple(decay_half_lives))
    return mixer


def replacement_plan(
    config, layers: Sequence[int] | str, mixer: str | None = None
) -> dict[int, str]:
    """Layer index -> target mixer name.

    ``layers`` is a list of indices (with ``mixer`` naming the target) or a pattern string
    of one letter per layer read through ``config.legend`` (``"AMMM"``: layers 1-3 become
    mamba2), where a letter that means ``attention`` keeps the layer.
    """
    names = layer_names(config)
    if isinstance(layers, str):
        if mixer is not None:
            raise ValueError("mixer must be None when layers is a pattern (the letters name them)")
        pattern = copy_config(config)
        pattern.layers = layers
        targets = layer_names(pattern)
        if len(targets) != len(names):
            raise ValueError(
                f"layers pattern {layers!r} has {len(targets)} letters; the model has "
                f"{len(names)} layers"
            )
        plan = {i: t for i, t in enumerate(targets) if t != names[i]}
    else:
        if mixer is None:
            raise ValueError("mixer (a registered mixer name) is required with layer indices")
        indices = [int(i) for i in layers]
        bad = [i for i in indices if not 0 <= i < len(names)]
        if bad or len(set(indices)) != len(indices):
            raise ValueError(
                f"layers must be distinct indices in [0, {len(names)}), got {list(layers)}"
            )
        plan = {i: mixer for i in sorted(indices)}
    for i, target in plan.items():
        if names[i] != "attention":
            raise ValueError(f"layer {i} is {names[i]!r}; only attention layers are converted")
        conversion(target)
    return plan


@dataclasses.dataclass(frozen=True)
class Student:
    """A converted model: ``model`` (a ``CausalLM``), its ``config`` and ``replaced``
    (layer index -> mixer name). Every other parameter is the teacher's."""

    model: CausalLM
    config: Any
    replaced: dict[int, str]


def check_teacher(teacher: CausalLM, config) -> None:
    """Raises ValueError when ``config`` does not describe ``teacher``."""
    names = layer_names(config)
    if tuple(teacher.layer_names) != names:
        raise ValueError(
            f"config.layers {list(names)} do not match the teacher's layers "
            f"{list(teacher.layer_names)}"
        )
    if teacher.backbone.d_model != int(config.d_model):
        raise ValueError(
            f"config.d_model is {config.d_model}; the teacher's width is {teacher.backbone.d_model}"
        )
    if teacher.vocab_size != int(config.vocab_size):
        raise ValueError(
            f"config.vocab_size is {config.vocab_size}; the teacher's is {teacher.vocab_size}"
        )


def convert(
    teacher: CausalLM,
    config,
    layers: Sequence[int] | str,
    mixer: str | None = None,
    *,
    mixers: Mapping[str, Mapping] | None = None,
    decay_half_lives=DEFAULT_HALF_LIVES,
    rngs: nnx.Rngs | None = None,
) -> Student:
    """The teacher with the chosen attention layers replaced by converted mixers.

    Args:
      teacher: a ``CausalLM`` (e.g. from ``load_pretrained``); it is not changed.
      config: the teacher's model config.
      layers: layer indices (with ``mixer``) or a pattern string (``replacement_plan``).
      mixer: the target mixer name for indices.
      mixers: per target mixer, overrides of its config (``{"mamba2": {"gated_norm":
        True}}``), applied over the conversion's defaults.
      decay_half_lives: the range of the initial per-head decay half-lives, in tokens.
      rngs: for parameters the mapping does not set (default ``nnx.Rngs(0)``).

    Returns:
      A ``Student``: the new model shares no arrays with the teacher; its config has the
      new mixers in ``layers`` and their sections in ``mixers``.
    """
    check_teacher(teacher, config)
    plan = replacement_plan(config, layers, mixer)
    mixers = dict(mixers or {})
    rngs = rngs or nnx.Rngs(0)
    student_cfg = copy_config(config)
    names = list(layer_names(config))
    params = {
        path: value
        for path, value in model_params(teacher).items()
        if not (path[:2] == ("backbone", "layers") and path[2] in plan and path[3] == "mixer")
    }
    for i, target in plan.items():
        attention = teacher.backbone.layers[i].mixer
        new = convert_layer(
            attention,
            target,
            config,
            overrides=mixers.get(target),
            decay_half_lives=decay_half_lives,
            rngs=rngs,
        )
        student_cfg.mixers[target] = mixer_section(
            attention_weights(attention), target, int(config.d_model), mixers.get(target)
        )
        names[i] = target
        for path, value in model_params(new).items():
            params[("backbone", "layers", i, "mixer", *path)] = value
    student_cfg.layers = names
    student_cfg = ml_collections.ConfigDict(student_cfg.to_dict(), type_safe=False)
    return Student(model_from_params(student_cfg, params), student_cfg, dict(plan))


def new_parameters(replaced: Mapping[int, str] | Sequence[int]):
    """An nnx filter for the parameters of the replaced layers' mixers (what attention
    transfer trains while the rest stays the teacher's):
    ``nnx.state(student.model, new_parameters(student.replaced))``."""
    layers = frozenset(int(i) for i in replaced)

    def select(path, value) -> bool:
        return (
            isinstance(value, nnx.Param)
            and len(path) > 3
            and tuple(path[:2]) == ("backbone", "layers")
            and path[2] in layers
            and path[3] == "mixer"
        )

    return select


def least_important(scores: Mapping[int, float], count: int) -> list[int]:
    """The ``count`` layer indices with the lowest scores (ties by index), sorted."""
    if not 0 <= int(count) <= len(scores):
        raise ValueError(f"count must be in [0, {len(scores)}], got {count}")
    ranked = sorted(scores, key=lambda i: (scores[i], i))
    return sorted(ranked[: int(count)])
