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

from affseg.config import Config, ConfigError, from_dict, fusable, packaged_config, parse_override, read_yaml, set_path

# The repository's top-level sweeps/ folder, installed as package affseg.sweeps (pyproject.toml).
SWEEPS_DIR = Path(str(importlib.resources.files("affseg.sweeps")))
PROFILES_DIR = SWEEPS_DIR / "profiles"

PARAM_KINDS = ("uniform", "loguniform", "int", "categorical")
PARAM_FIELDS = ("type", "low", "high", "step", "choices")
PRUNER_TYPES = ("median", "successive_halving", "hyperband")
MODES = ("max", "min")
METRICS = ("val/miou", "val/pixel_acc", "val/mean_acc", "pseudo/cam", "pseudo/cam_par", "pseudo/refined")
CONFIG_SECTIONS = tuple(f.name for f in dataclasses.fields(Config))

SETTING_KEYS = ("metric", "mode", "trials", "concurrency", "max_failures", "cpus_per_trial", "pruner", "sampler",
                "fuse")
SPACE_KEYS = ("include", "parameters", "conditions", "base", *SETTING_KEYS)
PROFILE_KEYS = ("config", "base", "parameters", *SETTING_KEYS)


@dataclass(frozen=True)
class PrunerSpec:
    """An Optuna pruner; steps are training iterations (the validation's `iteration`)."""

    type: str = "median"
    n_startup_trials: int | None = None  # trials that must complete before any pruning (None: 2 for median, 0 else)
    n_warmup_steps: int = 0  # median: no pruning at or before this iteration
    min_resource: int | str = "auto"  # successive halving / hyperband: iterations of the first rung, or "auto"
    reduction_factor: int = 3  # successive halving / hyperband: keep the top 1/reduction_factor per rung
    signal: str = ""  # the metric the pruner reads at each validation; "" = the sweep's objective metric


@dataclass(frozen=True)
class Condition:
    """Active when the categorical parameter `key` took one of `values`."""

    key: str
    values: tuple


@dataclass(frozen=True)
class Parameter:
    """One swept config key and its distribution."""

    key: str  # dotted Config key, e.g. refine.alpha
    kind: str  # one of PARAM_KINDS
    low: float | int | None = None
    high: float | int | None = None
    step: float | int | None = None
    choices: tuple = ()
    when: Condition | None = None

    def suggest(self, trial) -> Any:
        """Ask an Optuna trial for this parameter's value."""
        if self.kind == "categorical":
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.key, self.low, self.high, step=self.step or 1)
        return trial.suggest_float(self.key, self.low, self.high, step=self.step, log=self.kind == "loguniform")


@dataclass(frozen=True)
class SweepSpec:
    """A validated sweep: what to sample, the base config, the objective and the budget."""

    name: str  # the space's file stem, e.g. refine
    profile: str  # the profile's file stem, e.g. demo
    path: Path
    parameters: tuple[Parameter, ...]  # unconditional ones first
    base: dict = field(repr=False)  # merged config mapping every trial starts from
    metric: str  # one of METRICS, reported at every validation
    mode: str  # max | min
    trials: int  # the trial budget
    concurrency: int  # parallel trials (groups when fuse > 1) when no GPU is visible (with GPUs: one per GPU)
    max_failures: int  # restarts of a trial from its last checkpoint when its worker dies or it raises
    cpus_per_trial: int
    pruner: PrunerSpec
    seed: int  # the TPE sampler's seed
    fuse: int = 1  # trials trained together on one teacher pass (SPEC §5.4); 1 = every trial alone

    def sample(self, trial) -> dict[str, Any]:
        """Define-by-run: ask `trial` for every parameter whose condition holds; returns {key: value}."""
        values: dict[str, Any] = {}
        for parameter in self.parameters:
            if parameter.when is None or values.get(parameter.when.key) in parameter.when.values:
                values[parameter.key] = parameter.suggest(trial)
        return values

    def trial_config(self, params: dict[str, Any], overrides: dict[str, Any] | None = None) -> Config:
        """The base configuration with `params` (dotted keys) and then `overrides` (dotted keys) set."""
        values = copy.deepcopy(self.base)
        for key, value in {**params, **(overrides or {})}.items():
            set_path(values, key.split("."), value)
        return from_dict(values)


DEFAULT_SETTINGS: dict[str, Any] = {  # the lowest layer, under every profile and space
    "metric": "val/miou", "mode": "max", "trials": 8, "concurrency": 1, "max_failures": 2, "cpus_per_trial": 1,
    "pruner": dataclasses.asdict(PrunerSpec()), "sampler": {"seed": 0}, "fuse": 1,
}


# ---------------------------------------------------------------- small helpers


def _fail(where: str, message: str) -> typing.NoReturn:
    raise ConfigError(f"{where}: {message}")


def _merge(low: dict, high: dict) -> dict:
    """Deep merge: mappings merge key by key, anything else in `high` replaces `low`."""
    merged = dict(low)
    for key, value in high.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _nested(key: str, value: Any) -> dict:
    values: dict = {}
    set_path(values, key.split("."), value)
    return values


def _check_keys(values: dict, allowed: tuple[str, ...], where: str) -> None:
    for key in values:
        if key not in allowed:
            _fail(where, f"unknown key {key!r}; allowed: {', '.join(allowed)}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _number(value: Any, where: str, integer: bool) -> int | float:
    if isinstance(value, str) and not integer:  # YAML 1.1 reads 1e-4 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    if integer and (isinstance(value, bool) or not isinstance(value, int)):
        _fail(where, f"expected an integer, got {value!r}")
    if not _is_number(value):
        _fail(where, f"expected a number, got {value!r}")
    return value


def _check_config_key(key: str, where: str) -> Any:
    """`key` must name a leaf field of `Config`, e.g. refine.alpha or refine.par.w1; returns its type."""
    node: Any = Config
    parts = key.split(".")
    for depth, part in enumerate(parts):
        prefix = ".".join(parts[:depth])
        if not dataclasses.is_dataclass(node):
            _fail(where, f"{prefix} is a value, not a section")
        names = [f.name for f in dataclasses.fields(node)]
        if part not in names:
            section = f"under {prefix}" if prefix else "sections"
            _fail(where, f"unknown config key; allowed {section}: {', '.join(names)}")
        node = typing.get_type_hints(node)[part]
    if dataclasses.is_dataclass(node):
        _fail(where, f"{key} is a section; sweep one of its keys: {', '.join(f.name for f in dataclasses.fields(node))}")
    return node


def _check_config_value(key: str, value: Any, source: str) -> None:
    """The Config dataclass must accept `value` at `key` (type, Literal choices, ranges)."""
    try:
        from_dict(_nested(key, value))
    except ConfigError as err:
        raise ConfigError(f"{source}: parameters.{err}") from None


# ---------------------------------------------------------------- parameters and conditions


def _parameter(key: str, entry: Any, source: str) -> Parameter:
    where = f"{source}: parameters.{key}"
    field_type = _check_config_key(key, where)
    if not isinstance(entry, dict):
        _fail(where, "expected a mapping {type, low, high[, step]} or {type: categorical, choices}")
    _check_keys(entry, PARAM_FIELDS, where)
    kind = entry.get("type")
    if kind not in PARAM_KINDS:
        _fail(f"{where}.type", f"{kind!r} is not allowed; choose one of {', '.join(PARAM_KINDS)}")
    if kind == "categorical":
        for name in ("low", "high", "step"):
            if name in entry:
                _fail(f"{where}.{name}", "does not apply to a categorical parameter; list its choices")
        choices = entry.get("choices")
        if not isinstance(choices, list) or not choices:
            literal = typing.get_args(field_type) if typing.get_origin(field_type) is typing.Literal else ()
            allowed = f" ({', '.join(map(repr, literal))})" if literal else ""
            _fail(f"{where}.choices", f"must be a non-empty list of values allowed for {key}{allowed}")
        for choice in choices:
            _check_config_value(key, choice, source)
        return Parameter(key, kind, choices=tuple(choices))
    if "choices" in entry:
        _fail(f"{where}.choices", f"only categorical parameters have choices; {kind} takes low and high")
    for name in ("low", "high"):
        if name not in entry:
            _fail(where, f"{kind} needs low and high")
    if field_type is int and kind != "int":
        _fail(f"{where}.type", f"{key} is an integer; use type: int (or categorical)")
    integer = kind == "int"
    low = _number(entry["low"], f"{where}.low", integer)
    high = _number(entry["high"], f"{where}.high", integer)
    if not low < high:
        _fail(where, f"low ({low}) must be below high ({high})")
    if kind == "loguniform" and low <= 0:
        _fail(f"{where}.low", f"loguniform needs low > 0, got {low}")
    step = entry.get("step")
    if step is not None:
        if kind == "loguniform":
            _fail(f"{where}.step", "loguniform takes no step; use uniform with a step, or drop it")
        step = _number(step, f"{where}.step", integer)
        if step <= 0:
            _fail(f"{where}.step", f"must be > 0, got {step}")
    for value in (low, high):
        _check_config_value(key, value, source)
    return Parameter(key, kind, low, high, step)


def _conditions(raw: Any, parameters: dict[str, Parameter], source: str) -> dict[str, Parameter]:
    """Attach `conditions:` to their parameters; each names one unconditional categorical parameter."""
    if not isinstance(raw, dict):
        _fail(f"{source}: conditions", "expected a mapping {parameter: {categorical parameter: value(s)}}")
    conditioned = dict(parameters)
    for target, rule in raw.items():
        where = f"{source}: conditions.{target}"
        if target not in parameters:
            _fail(where, f"not a parameter of this space; parameters: {', '.join(parameters)}")
        if not isinstance(rule, dict) or len(rule) != 1:
            _fail(where, "expected exactly one {categorical parameter: value or [values]}")
        ((key, allowed),) = rule.items()
        source_param = parameters.get(key)
        if source_param is None or source_param.kind != "categorical" or key in raw:
            choices = [p.key for p in parameters.values() if p.kind == "categorical" and p.key not in raw]
            allowed = f"choose one of {', '.join(choices)}" if choices else "this space has none"
            _fail(where, f"{key!r} must be an unconditional categorical parameter of the space; {allowed}")
        values = tuple(allowed) if isinstance(allowed, list) else (allowed,)
        for value in values:
            if value not in source_param.choices:
                _fail(f"{where}.{key}", f"{value!r} is not among its choices {list(source_param.choices)}")
        conditioned[target] = dataclasses.replace(parameters[target], when=Condition(key, values))
    return conditioned


# ---------------------------------------------------------------- settings


def _settings(values: dict, source: str) -> dict:
    """Validate the sweep-level keys present in one layer (file or overrides)."""
    checked = {}
    for key in SETTING_KEYS:
        if key not in values:
            continue
        value, where = values[key], f"{source}: {key}"
        if key == "metric" and value not in METRICS:
            _fail(where, f"{value!r} is not reported by trials; choose one of {', '.join(METRICS)}")
        elif key == "mode" and value not in MODES:
            _fail(where, f"{value!r} is not allowed; choose one of {', '.join(MODES)}")
        elif key in ("trials", "concurrency", "cpus_per_trial", "max_failures", "fuse"):
            value = _number(value, where, integer=True)
            minimum = 0 if key == "max_failures" else 1
            if value < minimum:
                _fail(where, f"must be >= {minimum}, got {value}")
        elif key == "pruner":
            value = _pruner(value, where)
        elif key == "sampler":
            if not isinstance(value, dict):
                _fail(where, "expected a mapping {seed: int}")
            _check_keys(value, ("seed",), where)
            if "seed" in value:
                _number(value["seed"], f"{where}.seed", integer=True)
        checked[key] = value
    return checked


def _pruner(value: Any, where: str) -> dict:
    if not isinstance(value, dict):
        _fail(where, f"expected a mapping with keys {', '.join(f.name for f in dataclasses.fields(PrunerSpec))}")
    _check_keys(value, tuple(f.name for f in dataclasses.fields(PrunerSpec)), where)
    if "type" in value and value["type"] not in PRUNER_TYPES:
        _fail(f"{where}.type", f"{value['type']!r} is not allowed; choose one of {', '.join(PRUNER_TYPES)}")
    for name in ("n_startup_trials", "n_warmup_steps", "reduction_factor"):
        if name in value and _number(value[name], f"{where}.{name}", integer=True) < 0:
            _fail(f"{where}.{name}", f"must be >= 0, got {value[name]}")
    if value.get("signal", "") not in ("", *METRICS):
        _fail(f"{where}.signal", f"{value['signal']!r} is not reported by trials; choose one of {', '.join(METRICS)}")
    if value.get("reduction_factor", 2) < 2:
        _fail(f"{where}.reduction_factor", f"must be >= 2, got {value['reduction_factor']}")
    resource = value.get("min_resource", "auto")
    if resource != "auto" and (_number(resource, f"{where}.min_resource", integer=True) < 1):
        _fail(f"{where}.min_resource", f"must be 'auto' or an integer >= 1, got {resource!r}")
    return value


def _base(values: Any, source: str) -> dict:
    if not isinstance(values, dict):
        _fail(f"{source}: base", "expected a mapping of config sections")
    try:
        from_dict(values)
    except ConfigError as err:
        raise ConfigError(f"{source}: base: {err}") from None
    return values


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
    _check_keys(raw, SPACE_KEYS, str(path))
    layer = _Layer()
    includes = raw.get("include", [])
    if not isinstance(includes, list):
        _fail(f"{path}: include", "expected a list of space names or paths")
    for name in includes:
        included = _read_space(_space_path(name, path.parent), (*seen, path))
        layer.parameters.update(included.parameters)
        layer.conditions.update(included.conditions)
        layer.base = _merge(layer.base, included.base)
        layer.settings = _merge(layer.settings, included.settings)
    parameters = raw.get("parameters", {})
    if not isinstance(parameters, dict):
        _fail(f"{path}: parameters", "expected a mapping {config.key: {type, ...}}")
    layer.parameters.update({key: _parameter(key, entry, str(path)) for key, entry in parameters.items()})
    conditions = raw.get("conditions", {})
    if not isinstance(conditions, dict):
        _fail(f"{path}: conditions", "expected a mapping {parameter: {categorical parameter: value(s)}}")
    layer.conditions.update(conditions)
    _conditions(layer.conditions, layer.parameters, str(path))
    layer.base = _merge(layer.base, _base(raw.get("base", {}), str(path)))
    layer.settings = _merge(layer.settings, _settings(raw, str(path)))
    return layer


def _read_profile(name: str) -> _Layer:
    path = PROFILES_DIR / f"{name}.yaml"
    if not path.is_file():
        choices = ", ".join(sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))) or "none found"
        raise ConfigError(f"{path}: no such profile; choose one of {choices}")
    raw = read_yaml(path)
    _check_keys(raw, PROFILE_KEYS, str(path))
    start = read_yaml(packaged_config(raw["config"])) if "config" in raw else {}
    parameters = raw.get("parameters", {})
    if not isinstance(parameters, dict):
        _fail(f"{path}: parameters", "expected a mapping {config.key: {type, ...}}")
    return _Layer(
        parameters={key: _parameter(key, entry, str(path)) for key, entry in parameters.items()},
        base=_merge(start, _base(raw.get("base", {}), str(path))),
        settings=_settings(raw, str(path)),
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
            _check_config_key(".".join(path), f"override {text!r}")
            set_path(layer.base, path, value)
        elif path[0] in SETTING_KEYS:
            set_path(settings, path, value)
        else:
            allowed = ", ".join((*SETTING_KEYS, *CONFIG_SECTIONS))
            raise ConfigError(f"override {text!r}: unknown key {path[0]!r}; allowed: {allowed}")
    layer.settings = _merge(layer.settings, _settings(settings, "overrides"))


def load_space(name_or_path: str | Path, profile: str = "demo", overrides: typing.Iterable[str] = ()) -> SweepSpec:
    """Read and validate a space and a profile (names under sweeps/, or a space YAML path)."""
    path = _space_path(name_or_path)
    if not path.is_file():
        raise ConfigError(f"{path}: sweep space file not found")
    profile_layer = _read_profile(profile)
    space_layer = _read_space(path)
    layer = _Layer(
        parameters=_profile_ranges(
            _conditions(space_layer.conditions, space_layer.parameters, str(path)), profile_layer.parameters
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
        _check_fusable(layer.parameters, f"{path} over profile {profile}")
    ordered = sorted(layer.parameters.values(), key=lambda p: p.when is not None)
    return SweepSpec(
        name=path.stem, profile=profile, path=path, parameters=tuple(ordered), base=layer.base,
        metric=settings["metric"], mode=settings["mode"], trials=settings["trials"],
        concurrency=settings["concurrency"], max_failures=settings["max_failures"],
        cpus_per_trial=settings["cpus_per_trial"], pruner=PrunerSpec(**settings["pruner"]),
        seed=settings["sampler"]["seed"], fuse=settings["fuse"],
    )


def _check_fusable(parameters: dict[str, Parameter], source: str) -> None:
    """With fuse > 1 every swept key must act after the teacher (SPEC §5.4); one line naming the first that does not."""
    for key in parameters:
        if not fusable(key):
            raise ConfigError(f"{source}: parameters.{key} cannot be fused (fuse > 1 shares the teacher pass, so only "
                              "refine.*, loss.*, optim.lr, optim.warmup_iters, optim.weight_decay may vary); "
                              "sweep it with fuse=1")
