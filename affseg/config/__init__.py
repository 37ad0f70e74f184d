"""Typed configuration: one dataclass per part, YAML loading, `key.sub=value` overrides.

`schema` holds the dataclasses (every default is the number fixed in SPEC.md), `checks` the range checks,
`coercion` the dict ↔ dataclass conversion and `loading` files, overrides, presets and YAML output. Errors are
one line and name the offending key, the value given and what is allowed.
"""

from affseg.config.coercion import from_dict, to_dict
from affseg.config.loading import (
    ENV_PATTERN,
    PACKAGED_CONFIGS,
    dump_config,
    expand_env,
    load_config,
    packaged_config,
    parse_override,
    preset_overrides,
    read_yaml,
    save_config,
    set_path,
)
from affseg.config.schema import (
    CROP_MULTIPLE,
    SWIN_STAGES,
    Config,
    ConfigError,
    DataConfig,
    EvalConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    ParConfig,
    RefineConfig,
    TrackingConfig,
    TrainConfig,
    fusable,
)

__all__ = [
    "fusable", "CROP_MULTIPLE", "ENV_PATTERN", "PACKAGED_CONFIGS", "SWIN_STAGES",
    "Config", "ConfigError", "DataConfig", "EvalConfig", "LossConfig", "ModelConfig", "OptimConfig", "ParConfig",
    "RefineConfig", "TrackingConfig", "TrainConfig",
    "dump_config", "expand_env", "from_dict", "load_config", "packaged_config", "parse_override",
    "preset_overrides", "read_yaml", "save_config", "set_path", "to_dict",
]
