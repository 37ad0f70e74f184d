"""From text to a `Config` and back: YAML files with `${ENV}` expansion, `key.sub=value` overrides,
the configurations and presets shipped in `affseg/configs/`, and YAML output.

Errors are one line and name the file, the key and what to do.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import yaml

from affseg.config.coercion import from_dict, to_dict
from affseg.config.schema import Config, ConfigError

ENV_PATTERN = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
PACKAGED_CONFIGS = Path(__file__).parents[1] / "configs"  # affseg/configs/: demo.yaml, voc.yaml, presets/


def parse_override(text: str) -> tuple[list[str], Any]:
    """`"refine.alpha=3"` → (["refine", "alpha"], 3); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def set_path(values: dict, path: list[str], value: Any) -> None:
    """Set `values[path[0]][path[1]]... = value`, creating mappings on the way."""
    node = values
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(path)}: {part} is not a section")
        node = child
    node[path[-1]] = value


def expand_env(values: Any, path: Path, key: str = "") -> Any:
    """Replace `${VAR}` in string values by the environment variable; unset → one-line ConfigError."""
    if isinstance(values, dict):
        return {k: expand_env(v, path, f"{key}.{k}" if key else str(k)) for k, v in values.items()}
    if isinstance(values, list):
        return [expand_env(v, path, f"{key}[{i}]") for i, v in enumerate(values)]
    if isinstance(values, str):
        for name in ENV_PATTERN.findall(values):
            if name not in os.environ:
                raise ConfigError(f"{path}: {key} needs environment variable {name}, which is not set")
        return ENV_PATTERN.sub(lambda m: os.environ[m.group(1)], values)
    return values


def read_yaml(path: str | Path) -> dict:
    """Read a YAML mapping; a missing file or a syntax error is a one-line ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}:{where} is not valid YAML ({getattr(err, 'problem', err)})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    return expand_env(values, path)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults ← YAML file (optional) ← `key.sub=value` overrides, validated."""
    values = read_yaml(path) if path else {}
    for text in overrides:
        key_path, value = parse_override(text)
        set_path(values, key_path, value)
    try:
        return from_dict(values)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}" if path else str(err)) from None


def packaged_config(name: str) -> Path:
    """Path of a configuration shipped with the package (`demo`, `voc`)."""
    path = PACKAGED_CONFIGS / f"{name}.yaml"
    if not path.is_file():
        choices = ", ".join(sorted(p.stem for p in PACKAGED_CONFIGS.glob("*.yaml")))
        raise ConfigError(f"no packaged config {name!r}; choose one of {choices}")
    return path


def _leaves(values: dict, prefix: str = "") -> list[str]:
    """A nested mapping as `key.sub=value` lines; JSON values are YAML, so `parse_override` reads them back."""
    lines = []
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        lines += _leaves(value, f"{dotted}.") if isinstance(value, dict) else [f"{dotted}={json.dumps(value)}"]
    return lines


def preset_overrides(name: str) -> list[str]:
    """A packaged preset (configs/presets/<name>.yaml, e.g. `reference`) as `key.sub=value` overrides."""
    path = PACKAGED_CONFIGS / "presets" / f"{name}.yaml"
    if not path.is_file():
        choices = ", ".join(sorted(p.stem for p in path.parent.glob("*.yaml")))
        raise ConfigError(f"no preset {name!r}; choose one of {choices}")
    return _leaves(read_yaml(path))


def dump_config(config: Config) -> str:
    """The whole configuration as YAML text, keys in schema order, lists of numbers on one line (`[1, 2]`);
    `load_config` reads it back."""
    return yaml.safe_dump(to_dict(config), sort_keys=False, default_flow_style=None)


def save_config(config: Config, path: str | Path) -> None:
    Path(path).write_text(dump_config(config))
