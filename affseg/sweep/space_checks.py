"""Validation of a space or profile file's raw YAML values: each check returns the value it accepts (a
`Parameter`, the settings of one layer, ...) or raises one `ConfigError` line naming the file, the key and
what is allowed. Used by `affseg.sweep.space`, which reads and layers the files.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

from affseg.config import Config, ConfigError, from_dict, fusable, set_path
from affseg.sweep.spec import (
    METRICS, MODES, PARAM_FIELDS, PARAM_KINDS, PRUNER_TYPES, SETTING_KEYS, Condition, Parameter, PrunerSpec,
)

# ---------------------------------------------------------------- small helpers


def fail(where: str, message: str) -> typing.NoReturn:
    raise ConfigError(f"{where}: {message}")

def _nested(key: str, value: Any) -> dict:
    values: dict = {}
    set_path(values, key.split("."), value)
    return values


def check_keys(values: dict, allowed: tuple[str, ...], where: str) -> None:
    for key in values:
        if key not in allowed:
            fail(where, f"unknown key {key!r}; allowed: {', '.join(allowed)}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _number(value: Any, where: str, integer: bool) -> int | float:
    if isinstance(value, str) and not integer:  # YAML 1.1 reads 1e-4 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    if integer and (isinstance(value, bool) or not isinstance(value, int)):
        fail(where, f"expected an integer, got {value!r}")
    if not _is_number(value):
        fail(where, f"expected a number, got {value!r}")
    return value


def check_config_key(key: str, where: str) -> Any:
    """`key` must name a leaf field of `Config`, e.g. refine.alpha or refine.par.w1; returns its type."""
    node: Any = Config
    parts = key.split(".")
    for depth, part in enumerate(parts):
        prefix = ".".join(parts[:depth])
        if not dataclasses.is_dataclass(node):
            fail(where, f"{prefix} is a value, not a section")
        names = [f.name for f in dataclasses.fields(node)]
        if part not in names:
            section = f"under {prefix}" if prefix else "sections"
            fail(where, f"unknown config key; allowed {section}: {', '.join(names)}")
        node = typing.get_type_hints(node)[part]
    if dataclasses.is_dataclass(node):
        fail(where, f"{key} is a section; sweep one of its keys: {', '.join(f.name for f in dataclasses.fields(node))}")
    return node


def _check_config_value(key: str, value: Any, source: str) -> None:
    """The Config dataclass must accept `value` at `key` (type, Literal choices, ranges)."""
    try:
        from_dict(_nested(key, value))
    except ConfigError as err:
        raise ConfigError(f"{source}: parameters.{err}") from None


# ---------------------------------------------------------------- parameters and conditions


def parameter(key: str, entry: Any, source: str) -> Parameter:
    where = f"{source}: parameters.{key}"
    field_type = check_config_key(key, where)
    if not isinstance(entry, dict):
        fail(where, "expected a mapping {type, low, high[, step]} or {type: categorical, choices}")
    check_keys(entry, PARAM_FIELDS, where)
    kind = entry.get("type")
    if kind not in PARAM_KINDS:
        fail(f"{where}.type", f"{kind!r} is not allowed; choose one of {', '.join(PARAM_KINDS)}")
    if kind == "categorical":
        for name in ("low", "high", "step"):
            if name in entry:
                fail(f"{where}.{name}", "does not apply to a categorical parameter; list its choices")
        choices = entry.get("choices")
        if not isinstance(choices, list) or not choices:
            literal = typing.get_args(field_type) if typing.get_origin(field_type) is typing.Literal else ()
            allowed = f" ({', '.join(map(repr, literal))})" if literal else ""
            fail(f"{where}.choices", f"must be a non-empty list of values allowed for {key}{allowed}")
        for choice in choices:
            _check_config_value(key, choice, source)
        return Parameter(key, kind, choices=tuple(choices))
    if "choices" in entry:
        fail(f"{where}.choices", f"only categorical parameters have choices; {kind} takes low and high")
    for name in ("low", "high"):
        if name not in entry:
            fail(where, f"{kind} needs low and high")
    if field_type is int and kind != "int":
        fail(f"{where}.type", f"{key} is an integer; use type: int (or categorical)")
    integer = kind == "int"
    low = _number(entry["low"], f"{where}.low", integer)
    high = _number(entry["high"], f"{where}.high", integer)
    if not low < high:
        fail(where, f"low ({low}) must be below high ({high})")
    if kind == "loguniform" and low <= 0:
        fail(f"{where}.low", f"loguniform needs low > 0, got {low}")
    step = entry.get("step")
    if step is not None:
        if kind == "loguniform":
            fail(f"{where}.step", "loguniform takes no step; use uniform with a step, or drop it")
        step = _number(step, f"{where}.step", integer)
        if step <= 0:
            fail(f"{where}.step", f"must be > 0, got {step}")
    for value in (low, high):
        _check_config_value(key, value, source)
    return Parameter(key, kind, low, high, step)


def conditions(raw: Any, parameters: dict[str, Parameter], source: str) -> dict[str, Parameter]:
    """Attach `conditions:` to their parameters; each names one unconditional categorical parameter."""
    if not isinstance(raw, dict):
        fail(f"{source}: conditions", "expected a mapping {parameter: {categorical parameter: value(s)}}")
    conditioned = dict(parameters)
    for target, rule in raw.items():
        where = f"{source}: conditions.{target}"
        if target not in parameters:
            fail(where, f"not a parameter of this space; parameters: {', '.join(parameters)}")
        if not isinstance(rule, dict) or len(rule) != 1:
            fail(where, "expected exactly one {categorical parameter: value or [values]}")
        ((key, allowed),) = rule.items()
        source_param = parameters.get(key)
        if source_param is None or source_param.kind != "categorical" or key in raw:
            choices = [p.key for p in parameters.values() if p.kind == "categorical" and p.key not in raw]
            allowed = f"choose one of {', '.join(choices)}" if choices else "this space has none"
            fail(where, f"{key!r} must be an unconditional categorical parameter of the space; {allowed}")
        values = tuple(allowed) if isinstance(allowed, list) else (allowed,)
        for value in values:
            if value not in source_param.choices:
                fail(f"{where}.{key}", f"{value!r} is not among its choices {list(source_param.choices)}")
        conditioned[target] = dataclasses.replace(parameters[target], when=Condition(key, values))
    return conditioned


# ---------------------------------------------------------------- settings


def settings(values: dict, source: str) -> dict:
    """Validate the sweep-level keys present in one layer (file or overrides)."""
    checked = {}
    for key in SETTING_KEYS:
        if key not in values:
            continue
        value, where = values[key], f"{source}: {key}"
        if key == "metric" and value not in METRICS:
            fail(where, f"{value!r} is not reported by trials; choose one of {', '.join(METRICS)}")
        elif key == "mode" and value not in MODES:
            fail(where, f"{value!r} is not allowed; choose one of {', '.join(MODES)}")
        elif key in ("trials", "concurrency", "cpus_per_trial", "max_failures", "fuse"):
            value = _number(value, where, integer=True)
            minimum = 0 if key == "max_failures" else 1
            if value < minimum:
                fail(where, f"must be >= {minimum}, got {value}")
        elif key == "pruner":
            value = _pruner(value, where)
        elif key == "sampler":
            if not isinstance(value, dict):
                fail(where, "expected a mapping {seed: int}")
            check_keys(value, ("seed",), where)
            if "seed" in value:
                _number(value["seed"], f"{where}.seed", integer=True)
        checked[key] = value
    return checked


def _pruner(value: Any, where: str) -> dict:
    if not isinstance(value, dict):
        fail(where, f"expected a mapping with keys {', '.join(f.name for f in dataclasses.fields(PrunerSpec))}")
    check_keys(value, tuple(f.name for f in dataclasses.fields(PrunerSpec)), where)
    if "type" in value and value["type"] not in PRUNER_TYPES:
        fail(f"{where}.type", f"{value['type']!r} is not allowed; choose one of {', '.join(PRUNER_TYPES)}")
    for name in ("n_startup_trials", "n_warmup_steps", "reduction_factor"):
        if name in value and _number(value[name], f"{where}.{name}", integer=True) < 0:
            fail(f"{where}.{name}", f"must be >= 0, got {value[name]}")
    if value.get("signal", "") not in ("", *METRICS):
        fail(f"{where}.signal", f"{value['signal']!r} is not reported by trials; choose one of {', '.join(METRICS)}")
    if value.get("reduction_factor", 2) < 2:
        fail(f"{where}.reduction_factor", f"must be >= 2, got {value['reduction_factor']}")
    resource = value.get("min_resource", "auto")
    if resource != "auto" and (_number(resource, f"{where}.min_resource", integer=True) < 1):
        fail(f"{where}.min_resource", f"must be 'auto' or an integer >= 1, got {resource!r}")
    return value


def base(values: Any, source: str) -> dict:
    if not isinstance(values, dict):
        fail(f"{source}: base", "expected a mapping of config sections")
    try:
        from_dict(values)
    except ConfigError as err:
        raise ConfigError(f"{source}: base: {err}") from None
    return values



def check_fusable(parameters: dict[str, Parameter], source: str) -> None:
    """With fuse > 1 every swept key must act after the teacher (SPEC §5.4); one line naming the first that does not."""
    for key in parameters:
        if not fusable(key):
            raise ConfigError(f"{source}: parameters.{key} cannot be fused (fuse > 1 shares the teacher pass, so only "
                              "refine.*, loss.*, optim.lr, optim.warmup_iters, optim.weight_decay may vary); "
                              "sweep it with fuse=1")
