"""Experiment configs by name or path, and ``key=value`` overrides of any key.

A config spec is ``<name or path>[:<variant>]``:

- a stock config by name (a module of ``seqmix.configs``: ``mqar``, ``lm_bytes``, ...), found
  wherever seqmix is installed: ``lm_bytes``, ``mqar:mixer=gla``;
- or a Python file defining ``get_config(arg=None)``: ``path/to/my_config.py:d_model=64``.

The variant (after the first ``:``) is passed to ``get_config`` as its argument.

``apply_overrides(config, ["model.d_model=128", "model.layers=GGGA"])`` sets any key of the
config, type-checked against the value it replaces (an int key takes an integer, a float
key a number, a bool key true/false, a list key a comma list); ``None``-valued keys take
JSON (``null``, numbers, strings, lists, objects) and plain strings. ``model.layers`` also
takes a pattern string read through ``model.legend`` (``GGGA``) or a single mixer name.
A ValueError names the key, what was given and what was expected.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import json
import os
import pkgutil
import re

import ml_collections

_PACKAGE = "seqmix.configs"
_NOT_CONFIGS = ("loader",)
# Stock configs that another launcher than seqmix-train runs: name -> launcher module.
LAUNCHERS = {"distill": "distill"}
RUNS_ENV = "SEQMIX_RUNS"


def stock_names(launcher: str | None = None) -> list[str]:
    """The names of the stock configs (the modules of ``seqmix.configs``); with
    ``launcher`` (``"train"``, ``"distill"``) only those that launcher runs
    (``seqmix.experiments.<launcher>``; see ``LAUNCHERS``)."""
    package = importlib.import_module(_PACKAGE)
    names = sorted(
        m.name
        for m in pkgutil.iter_modules(package.__path__)
        if not m.ispkg and m.name not in _NOT_CONFIGS and not m.name.startswith("_")
    )
    if launcher is None:
        return names
    return [n for n in names if LAUNCHERS.get(n, "train") == launcher]


def split_spec(spec: str) -> tuple[str, str | None]:
    """``(name or path, variant or None)`` of a config spec."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"config must name a stock config or a .py file, got {spec!r}")
    target, sep, variant = spec.strip().partition(":")
    return target, (variant if sep else None)


def _is_path(target: str) -> bool:
    return target.endswith(".py") or os.sep in target or "/" in target


def _load_module(target: str):
    if _is_path(target):
        path = os.path.abspath(os.path.expanduser(target))
        if not os.path.isfile(path):
            raise ValueError(
                f"config {target!r}: no such file ({path}); stock configs by name: "
                f"{', '.join(stock_names())}"
            )
        name = "seqmix_config_" + re.sub(r"\W", "_", os.path.splitext(os.path.basename(path))[0])
        module_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        return module
    names = stock_names()
    if target not in names:
        close = difflib.get_close_matches(target, names, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(
            f"config {target!r} is neither a stock config{hint} nor a .py file; stock "
            f"configs: {', '.join(names)}"
        )
    return importlib.import_module(f"{_PACKAGE}.{target}")


def load(spec: str) -> ml_collections.ConfigDict:
    """The config of ``spec`` (see the module docstring)."""
    target, variant = split_spec(spec)
    module = _load_module(target)
    if not hasattr(module, "get_config"):
        raise ValueError(f"config {target!r} defines no get_config(arg=None)")
    return module.get_config(variant) if variant is not None else module.get_config()


def config_name(spec: str) -> str:
    """A directory-safe name of a spec: ``mqar``, ``mqar-mixer=gla``."""
    target, variant = split_spec(spec)
    name = os.path.splitext(os.path.basename(target))[0]
    if variant:
        name += "-" + re.sub(r"[^A-Za-z0-9_.=-]+", "_", variant.replace(",", "-"))
    return name


def runs_root() -> str:
    """Where runs go by default: ``$SEQMIX_RUNS``, else ``~/seqmix-runs``."""
    return os.path.abspath(
        os.path.expanduser(os.environ.get(RUNS_ENV) or os.path.join("~", "seqmix-runs"))
    )


def default_workdir(spec: str) -> str:
    """``<runs_root()>/<config_name(spec)>``: outside any source tree, the same directory
    whichever directory the command runs in."""
    return os.path.join(runs_root(), config_name(spec))


# ---------------------------------------------------------------------------- overrides

_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")
_INT = re.compile(r"[+-]?\d+")


def _expected(kind: str, key: str, raw: str, detail: str = "") -> ValueError:
    return ValueError(f"--config.{key}={raw!r}: expected {kind}{(' ' + detail) if detail else ''}")


def _parse_scalar(kind: type, key: str, raw: str):
    text = raw.strip()
    if kind is bool:
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise _expected("true or false", key, raw)
    if kind is int:
        if not _INT.fullmatch(text):
            raise _expected("an integer", key, raw)
        return int(text)
    if kind is float:
        try:
            return float(text)
        except ValueError:
            raise _expected("a number", key, raw) from None
    if kind is str:
        return raw
    raise _expected(f"a {kind.__name__}", key, raw)


def _parse_free(raw: str):
    """A value for a key without a typed default: JSON if it parses, else the string."""
    text = raw.strip()
    if text in ("None", "none"):
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return raw


def _parse_list(key: str, raw: str, like: list):
    text = raw.strip()
    if text.startswith("["):
        try:
            values = json.loads(text)
        except json.JSONDecodeError:
            raise _expected("a JSON list or a comma list", key, raw) from None
    else:
        values = [v.strip() for v in text.split(",")] if text else []
    kinds = {type(v) for v in like if v is not None}
    if len(kinds) == 1 and not text.startswith("["):
        (kind,) = kinds
        values = [_parse_scalar(kind, key, str(v)) for v in values]
    return values


def _parse_layers(key: str, raw: str, model) -> list:
    """``model.layers`` from a comma list of mixer names, one name, or a pattern string."""
    from seqmix.models.config import layer_names
    from seqmix.models.registry import MIXERS

    text = raw.strip()
    if "," in text or text.startswith("["):
        names = _parse_list(key, raw, [""])
    elif text in MIXERS:
        names = [text]
    else:
        probe = ml_collections.ConfigDict(
            {"layers": text, "legend": model.get("legend", {})}, type_safe=False
        )
        try:
            names = list(layer_names(probe))
        except ValueError as e:
            raise ValueError(
                f"--config.{key}={raw!r}: {e}; give a pattern of legend letters, a mixer "
                "name, or a comma list of mixer names"
            ) from None
        return names
    try:
        layer_names(ml_collections.ConfigDict({"layers": names}, type_safe=False))
    except ValueError as e:
        raise ValueError(f"--config.{key}={raw!r}: {e}") from None
    return names


def _parent_and_leaf(config, key: str):
    parts = key.split(".")
    if not all(parts):
        raise ValueError(f"--config.{key}: not a dotted key (e.g. model.d_model)")
    node, walked = config, []
    for part in parts[:-1]:
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            raise _unknown(node, part, walked, key)
        node = node[part]
        walked.append(part)
        if not isinstance(node, ml_collections.ConfigDict):
            raise ValueError(
                f"--config.{key}: {'.'.join(walked)} is a value ({node!r}), not a group of keys"
            )
    leaf = parts[-1]
    if leaf not in node:
        raise _unknown(node, leaf, walked, key)
    return node, leaf


def _unknown(node, part: str, walked: list, key: str) -> ValueError:
    keys = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
    where = ".".join(walked) or "the config"
    close = difflib.get_close_matches(part, keys, n=1)
    hint = f" (did you mean {'.'.join([*walked, close[0]])}?)" if close else ""
    return ValueError(f"--config.{key}: {where} has no key {part!r}{hint}; its keys: {keys}")


def _field_type(node, leaf: str):
    try:
        return node.get_type(leaf)
    except (AttributeError, KeyError, TypeError):
        value = node[leaf]
        return type(value)


def parse_override(config, key: str, raw: str):
    """The value ``raw`` (a command-line string) stands for at ``key`` of ``config``."""
    node, leaf = _parent_and_leaf(config, key)
    current = node[leaf]
    if key == "model.layers":
        return _parse_layers(key, raw, config.model)
    if isinstance(current, ml_collections.ConfigDict):
        raise ValueError(
            f"--config.{key} is a group of keys ({sorted(current.keys())}); override one "
            f"of them, e.g. --config.{key}.{sorted(current.keys())[0]}=..."
        )
    if isinstance(current, (list, tuple)):
        values = _parse_list(key, raw, list(current))
        return type(current)(values) if isinstance(current, tuple) else values
    kind = _field_type(node, leaf)
    if current is None:
        if raw.strip() in ("None", "none", "null"):
            return None
        if kind in (bool, int, float, str):
            return _parse_scalar(kind, key, raw)
        return _parse_free(raw)
    if isinstance(current, bool):
        return _parse_scalar(bool, key, raw)
    if isinstance(current, int):
        return _parse_scalar(int, key, raw)
    if isinstance(current, float):
        return _parse_scalar(float, key, raw)
    if isinstance(current, str):
        if raw.strip() in ("None", "null") and kind is not str:
            return None
        return raw
    if isinstance(current, dict):
        value = _parse_free(raw)
        if not isinstance(value, dict):
            raise _expected("a JSON object", key, raw)
        return value
    return _parse_free(raw)


def apply_overrides(config, overrides) -> ml_collections.ConfigDict:
    """Sets ``key=value`` items (strings, or ``(key, value)`` pairs) on ``config`` in place
    and returns it; ValueError naming the key for an unknown key or a value of the wrong
    type."""
    for item in overrides:
        if isinstance(item, str):
            key, sep, raw = item.partition("=")
            if not sep:
                raise ValueError(f"--config.{item}: give a value, as --config.{item}=VALUE")
        else:
            key, raw = item
        key = key.strip()
        value = parse_override(config, key, raw)
        node, leaf = _parent_and_leaf(config, key)
        try:
            with node.ignore_type():
                node[leaf] = value
        except (TypeError, ValueError) as e:
            raise ValueError(f"--config.{key}={raw!r}: {e}") from None
    return config
