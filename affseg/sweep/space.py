"""Search spaces as data: `sweeps/<space>.yaml` over a profile `sweeps/profiles/<profile>.yaml` → `SweepSpec`.

Layers, lowest first: built-in sweep defaults ← profile ← space (its `include:`s first) ← overrides.
`base:` mappings merge key by key into the trial configuration (the profile's packaged `config:` under
everything); each trial's sampled parameters go on top. A profile's `parameters:` only narrow the ranges
of keys the space already sweeps (schedule-dependent ones such as optim.warmup_iters).
Files are read with `yaml.safe_load` only.

A space file::

    parameters:                        # dotted Config keys
      refine.alpha: {type: int, low: 1, high: 4}
      refine.background: {type: categorical, choices: [power, constant]}
      refine.bg_power: {type: uniform, low: 0.5, high: 3.0}
    conditions:                        # sampled only while the named categorical has one of these values
      refine.bg_power: {refine.background: power}
    base: {refine: {par: {enabled: true}}}
    metric: val/miou
    mode: max
    pruner: {type: median, n_startup_trials: 2}
    sampler: {seed: 0}

Every error is one `ConfigError` line naming the file, the key and what is allowed.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.resources
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from affseg.config import ConfigError, from_dict, packaged_config, parse_override, read_yaml, set_path
from affseg.sweep import space_checks as checks
from affseg.sweep.spec import (
    CONFIG_SECTIONS, PARAM_KINDS, PROFILE_KEYS, PRUNER_TYPES, SETTING_KEYS, SPACE_KEYS, Condition, Parameter,
    PrunerSpec, SweepSpec,
)

# Re-exported: `from affseg.sweep.space import ...` keeps working for these, and a SweepSpec pickled before
# the classes moved to spec.py (a sweep's affseg_sweep.pkl, read on resume) still loads.
__all__ = ["PARAM_KINDS", "PRUNER_TYPES", "PROFILES_DIR", "SWEEPS_DIR", "Condition", "Parameter", "PrunerSpec",
           "SweepSpec", "load_space"]

# The repository's top-level sweeps/ folder, installed as package affseg.sweeps (pyproject.toml).
SWEEPS_DIR = Path(str(importlib.resources.files("affseg.sweeps")))
PROFILES_DIR = SWEEPS_DIR / "profiles"

DEFAULT_SETTINGS: dict[str, Any] = {  # the lowest layer, under every profile and space
    "metric": "val/miou", "mode": "max", "trials": 8, "concurrency": 1, "max_failures": 2, "cpus_per_trial": 1,
    "pruner": dataclasses.asdict(PrunerSpec()), "sampler": {"seed": 0}, "fuse": 1,
}


def _merge(low: dict, high: dict) -> dict:
    """Deep merge: mappings merge key by key, anything else in `high` replaces `low`."""
    merged = dict(low)
    for key, value in high.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


# ---------------------------------------------------------------- files


@dataclass
class _Layer:
    """What one file contributes."""

    parameters: dict[str, Parameter] = field(default_factory=dict)
    conditions: dict[str, Any] = field(default_factory=dict)
    base: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)


def _space_path(name_or_path: str | Path, relative_to: Path = SWEEPS_DIR) -> Path:
    text = str(name_or_path)
    if text.endswith((".yaml", ".yml")) or "/" in text:
        path = Path(text)
        return path if path.is_absolute() or path.exists() else relative_to / path
    path = relative_to / f"{text}.yaml"
    if not path.is_file():
        choices = ", ".join(sorted(p.stem for p in relative_to.glob("*.yaml"))) or "none found"
        raise ConfigError(f"{path}: no such sweep space; choose one of {choices} or pass a YAML path")
    return path


def _read_space(path: Path, seen: tuple[Path, ...] = ()) -> _Layer:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: include cycle through {' -> '.join(p.name for p in seen)}")
    raw = read_yaml(path)
    checks.check_keys(raw, SPACE_KEYS, str(path))
    layer = _Layer()
    includes = raw.get("include", [])
    if not isinstance(includes, list):
        checks.fail(f"{path}: include", "expected a list of space names or paths")
    for name in includes:
        included = _read_space(_space_path(name, path.parent), (*seen, path))
        layer.parameters.update(included.parameters)
        layer.conditions.update(included.conditions)
        layer.base = _merge(layer.base, included.base)
        layer.settings = _merge(layer.settings, included.settings)
    parameters = raw.get("parameters", {})
    if not isinstance(parameters, dict):
        checks.fail(f"{path}: parameters", "expected a mapping {config.key: {type, ...}}")
    layer.parameters.update({key: checks.parameter(key, entry, str(path)) for key, entry in parameters.items()})
    conditions = raw.get("conditions", {})
    if not isinstance(conditions, dict):
        checks.fail(f"{path}: conditions", "expected a mapping {parameter: {categorical parameter: value(s)}}")
    layer.conditions.update(conditions)
    checks.conditions(layer.conditions, layer.parameters, str(path))
    layer.base = _merge(layer.base, checks.base(raw.get("base", {}), str(path)))
    layer.settings = _merge(layer.settings, checks.settings(raw, str(path)))
    return layer


def _read_profile(name: str) -> _Layer:
    path = PROFILES_DIR / f"{name}.yaml"
    if not path.is_file():
        choices = ", ".join(sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))) or "none found"
        raise ConfigError(f"{path}: no such profile; choose one of {choices}")
    raw = read_yaml(path)
    checks.check_keys(raw, PROFILE_KEYS, str(path))
    start = read_yaml(packaged_config(raw["config"])) if "config" in raw else {}
    parameters = raw.get("parameters", {})
    if not isinstance(parameters, dict):
        checks.fail(f"{path}: parameters", "expected a mapping {config.key: {type, ...}}")
    return _Layer(
        parameters={key: checks.parameter(key, entry, str(path)) for key, entry in parameters.items()},
        base=_merge(start, checks.base(raw.get("base", {}), str(path))),
        settings=checks.settings(raw, str(path)),
    )


def _profile_ranges(space: dict[str, Parameter], profile: dict[str, Parameter]) -> dict[str, Parameter]:
    """A profile's `parameters:` replace the distribution of keys the space sweeps (schedule-dependent
    ranges such as warm-up length); keys the space does not sweep are left out."""
    return {key: dataclasses.replace(profile.get(key, p), when=p.when) for key, p in space.items()}


def _apply_overrides(layer: _Layer, overrides: typing.Iterable[str]) -> None:
    """`section.key=value` goes into the base config; `trials=4`, `pruner.type=...` into the settings."""
    settings: dict = {}
    for text in overrides:
        path, value = parse_override(text)
        if path[0] in CONFIG_SECTIONS:
            checks.check_config_key(".".join(path), f"override {text!r}")
            set_path(layer.base, path, value)
        elif path[0] in SETTING_KEYS:
            set_path(settings, path, value)
        else:
            allowed = ", ".join((*SETTING_KEYS, *CONFIG_SECTIONS))
            raise ConfigError(f"override {text!r}: unknown key {path[0]!r}; allowed: {allowed}")
    layer.settings = _merge(layer.settings, checks.settings(settings, "overrides"))


def load_space(name_or_path: str | Path, profile: str = "demo", overrides: typing.Iterable[str] = ()) -> SweepSpec:
    """Read and validate a space and a profile (names under sweeps/, or a space YAML path)."""
    path = _space_path(name_or_path)
    if not path.is_file():
        raise ConfigError(f"{path}: sweep space file not found")
    profile_layer = _read_profile(profile)
    space_layer = _read_space(path)
    layer = _Layer(
        parameters=_profile_ranges(
            checks.conditions(space_layer.conditions, space_layer.parameters, str(path)), profile_layer.parameters
        ),
        base=copy.deepcopy(_merge(profile_layer.base, space_layer.base)),
        settings=_merge(_merge(DEFAULT_SETTINGS, profile_layer.settings), space_layer.settings),
    )
    _apply_overrides(layer, overrides)
    if not layer.parameters:
        raise ConfigError(f"{path}: parameters: the space sweeps nothing; add at least one config key")
    try:
        from_dict(layer.base)
    except ConfigError as err:
        raise ConfigError(f"{path} over profile {profile}: base: {err}") from None
    settings = layer.settings
    if settings["fuse"] > 1:
        checks.check_fusable(layer.parameters, f"{path} over profile {profile}")
    ordered = sorted(layer.parameters.values(), key=lambda p: p.when is not None)
    return SweepSpec(
        name=path.stem, profile=profile, path=path, parameters=tuple(ordered), base=layer.base,
        metric=settings["metric"], mode=settings["mode"], trials=settings["trials"],
        concurrency=settings["concurrency"], max_failures=settings["max_failures"],
        cpus_per_trial=settings["cpus_per_trial"], pruner=PrunerSpec(**settings["pruner"]),
        seed=settings["sampler"]["seed"], fuse=settings["fuse"],
    )

