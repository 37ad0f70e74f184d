"""Plain nested dicts ↔ config dataclasses: each value checked against its annotation, then range-checked.

`from_dict` is the only way in (a partial dict fills in the defaults); `to_dict` the way out.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, get_args, get_origin

import yaml

from affseg.config.checks import validate
from affseg.config.schema import Config, ConfigError


YAML_SWITCHES = {False: "off", True: "on"}  # the choice a YAML boolean stands for in a Literal that offers it


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce_union(value: Any, tp: Any, key: str) -> Any:
    """The first option of `A | B | None` that `value` fits."""
    for option in get_args(tp):
        if option is type(None):
            if value is None:
                return None
            continue
        try:
            return _coerce(value, option, key)
        except ConfigError:
            pass
    raise ConfigError(f"{key}: {value!r} does not fit {_type_name(tp)}")


def _coerce_scalar(value: Any, tp: Any, key: str) -> Any:
    """bool, int, float (an int or a YAML-1.1 string like "1e-4" becomes a float) or str."""
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {tp}")  # a bug in the schema, not user input


def _number_list(text: str, key: str) -> list:
    """"2,3" → [2, 3]: how a sweep space writes a list-valued choice (Optuna stores choices as plain values)."""
    try:
        return [yaml.safe_load(part) for part in text.split(",") if part.strip()]
    except yaml.YAMLError:
        raise ConfigError(f"{key}: expected a list of numbers or a comma-separated string, got {text!r}") from None


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; return it converted (int → float only)."""
    origin = get_origin(tp)
    if origin is Literal:
        allowed = get_args(tp)
        if isinstance(value, bool) and YAML_SWITCHES[value] in allowed:  # YAML reads `off` / `on` as booleans
            value = YAML_SWITCHES[value]
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {', '.join(map(repr, allowed))}")
        return value
    if origin in (typing.Union, types.UnionType):
        return _coerce_union(value, tp, key)
    if origin is list:
        (item_tp,) = get_args(tp)
        if isinstance(value, str) and item_tp in (int, float):
            value = _number_list(value, key)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list of {_type_name(item_tp)}, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, key)
    return _coerce_scalar(value, tp, key)


def _build(cls: type, values: dict, prefix: str = "") -> Any:
    """A validated `cls` from `values`; missing keys keep their defaults, a nested dict merges into its section."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in values if k not in names]
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"unknown key {where}{unknown[0]}; allowed: {', '.join(names)}")
    default = cls()
    kwargs = {}
    for name in (n for n in names if n in values):
        key = f"{prefix}.{name}" if prefix else name
        current = getattr(default, name)
        if dataclasses.is_dataclass(current) and isinstance(values[name], dict):
            kwargs[name] = _build(type(current), {**to_dict(current), **values[name]}, key)
        else:
            kwargs[name] = _coerce(values[name], hints[name], key)
    config = cls(**kwargs)
    validate(config, prefix)
    return config


def to_dict(config: Any) -> dict:
    """A plain nested dict (YAML/JSON-ready) of a config dataclass."""
    return dataclasses.asdict(config)


def from_dict(values: dict) -> Config:
    """Build a validated `Config` from a (possibly partial) nested dict."""
    if not isinstance(values, dict):
        raise ConfigError(f"config must be a mapping, got {type(values).__name__}")
    return _build(Config, values)
