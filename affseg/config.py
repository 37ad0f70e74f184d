"""Typed configuration: one dataclass per part, YAML loading, `key.sub=value` overrides.

Every default is the number fixed in SPEC.md. Errors are one line and name the
offending key, the value given and what is allowed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml


class ConfigError(ValueError):
    """A bad configuration value, key or file; the message is one line."""


CROP_MULTIPLE = 16  # the encoder's grid stride: a training crop is a whole number of grid cells


@dataclass
class DataConfig:
    """Dataset location and augmentation (SPEC §3)."""

    root: str = "data/demo/VOCdevkit/VOC2012"  # a VOC2012 folder (JPEGImages, SegmentationClassAug, ...)
    demo: bool = True  # build the offline demo set at `root` when it is missing
    demo_seed: int = 0
    train_split: str = "train_aug"
    val_split: str = "val"
    cls_labels: str = "cls_labels_onehot.npy"  # relative to root
    crop_size: int = 224
    scale_min: float = 0.5
    scale_max: float = 2.0
    flip_prob: float = 0.5
    num_workers: int = 0
    pseudo_subset: int = 200  # first N train ids scored for pseudo-label quality
    val_limit: int = 0  # 0 = whole val split; >0 caps it (quick runs)


@dataclass
class ModelConfig:
    """Frozen encoder, CAM source and decoder (SPEC §2.1–2.3)."""

    encoder: str = "unicl_swin_tiny"  # registry name: unicl_swin_b | unicl_swin_tiny | clip_vit_b16 | clip_vit_tiny
    checkpoint: str = ""  # encoder weights file; "" = committed demo weights (tiny encoder); "random" = random init
    cam_method: Literal["gradcam", "gradcampp", "layercam"] = "gradcam"
    cam_block: int | None = None  # index among the stride-16 blocks; None = the encoder's default_cam_block
    prompt_template: str = "a clean origami {}."
    background_prompts: bool = True
    decoder_blocks: list[int] = field(default_factory=list)  # stride-16 block indices; [] = all of them
    affinity_blocks: list[int] = field(default_factory=list)  # stride-16 block indices; [] = all of them
    decoder_dim: int = 256
    decoder_mlp_dim: int = 256
    decoder_layers: int = 3
    decoder_heads: int = 8
    decoder_mlp_ratio: float = 4.0
    decoder_dropout: float = 0.1


@dataclass
class ParConfig:
    """Pixel-adaptive refinement (SPEC §2.4 step 9)."""

    enabled: bool = True
    iterations: int = 20
    dilations: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 12, 24])
    w1: float = 0.3
    w2: float = 0.01
    scale: float = 1.0  # 0.5 runs PAR at half resolution (AFA-style)


@dataclass
class RefineConfig:
    """Affinity refinement and pseudo-labels (SPEC §2.4)."""

    alpha: int = 2  # refinement strength: power of the transition matrix
    n0: int = 6  # candidate affinity blocks: the last n0
    warmup_blocks: int = 8  # before refine_start, R = mean of the last this-many encoder affinities
    deviation: Literal["abs", "signed"] = "abs"
    sinkhorn_iters: int = 3
    box_threshold: float = 0.4
    box_mask: Literal["output", "source"] = "output"
    box_clip: Literal["inclusive", "reference"] = "inclusive"  # reference: WeCLIP's exclusive fill + uint8 threshold
    refine_start: float = 1 / 3  # fraction of the schedule before A_f joins the refinement
    background: Literal["power", "constant"] = "power"
    bg_power: float = 1.0
    bg_score: float = 0.45
    ignore_band: bool = False
    low_threshold: float = 0.25
    high_threshold: float = 0.7
    par: ParConfig = field(default_factory=ParConfig)


@dataclass
class LossConfig:
    """L = L_seg + λ L_aff (SPEC §2.5)."""

    lam: float = 0.1
    seg: Literal["balanced", "plain"] = "balanced"
    aff: Literal["linear", "bce"] = "linear"
    aff_radius: int = 8  # grid cells


@dataclass
class OptimConfig:
    """AdamW with linear warm-up and polynomial decay (SPEC §3)."""

    lr: float = 5e-5
    beta1: float = 0.9
    beta2: float = 0.999
    weight_decay: float = 0.01
    warmup_iters: int = 500
    warmup_ratio: float = 1e-3
    poly_power: float = 1.0
    grad_clip: float = 0.0  # 0 = off; else max global grad norm


@dataclass
class TrainConfig:
    """Schedule, precision, checkpointing (SPEC §3). An iteration is one optimiser step."""

    iterations: int = 30_000
    batch_size: int = 4
    accumulation: int = 2
    val_interval: int = 2_000
    log_interval: int = 20
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"  # auto = bf16 on CUDA if supported, else fp16; off on CPU
    supervision: Literal["pseudo", "full"] = "pseudo"  # full: ground-truth masks, the fully supervised bound
    max_nonfinite: int = 10  # skipped steps (NaN/inf loss, or a rolled-back non-finite update) before training stops
    out_dir: str = "runs/train"


@dataclass
class EvalConfig:
    """Multi-scale evaluation and optional dense CRF (SPEC §3)."""

    long_side: int = 512
    scales: list[float] = field(default_factory=lambda: [1.0, 0.75])
    flip: bool = True
    crf: bool = False
    crf_iterations: int = 10
    crf_pos_xy: float = 3.0
    crf_pos_weight: float = 3.0
    crf_bi_xy: float = 64.0
    crf_bi_rgb: float = 5.0
    crf_bi_weight: float = 4.0


@dataclass
class TrackingConfig:
    """Where sweeps record results; server backends replace the local defaults on a cluster."""

    mlflow_uri: str = "sqlite:///mlflow/mlflow.db"
    artifact_root: str = "mlflow/artifacts"
    experiment: str = "affseg"
    optuna_storage: str = "sqlite:///mlflow/optuna.db"


@dataclass
class Config:
    """The whole training configuration."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    refine: RefineConfig = field(default_factory=RefineConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


# ---------------------------------------------------------------- conversion


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; return it converted (int → float only)."""
    origin = get_origin(tp)
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {', '.join(map(repr, allowed))}")
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in get_args(tp):
            if option is type(None):
                if value is None:
                    return None
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{key}: {value!r} does not fit {_type_name(tp)}")
    if origin is list:
        (item_tp,) = get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list of {_type_name(item_tp)}, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, key)
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
    raise ConfigError(f"{key}: unsupported type {tp}")  # a bug in this module, not user input


def _build(cls: type, values: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in values if k not in names]
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"unknown key {where}{unknown[0]}; allowed: {', '.join(names)}")
    default = cls()
    kwargs = {}
    for name in names:
        key = f"{prefix}.{name}" if prefix else name
        if name in values:
            current = getattr(default, name)
            if dataclasses.is_dataclass(current) and isinstance(values[name], dict):
                merged = {**to_dict(current), **values[name]}
                kwargs[name] = _build(type(current), merged, key)
            else:
                kwargs[name] = _coerce(values[name], hints[name], key)
    config = cls(**kwargs)
    _validate(config, prefix)
    return config


def _validate(config: Any, prefix: str) -> None:
    """Range checks that types alone cannot express."""

    def fail(key: str, message: str) -> None:
        raise ConfigError(f"{prefix}.{key}: {message}" if prefix else f"{key}: {message}")

    if isinstance(config, RefineConfig):
        if config.alpha < 1:
            fail("alpha", f"{config.alpha} must be an integer >= 1")
        if config.n0 < 1:
            fail("n0", f"{config.n0} must be >= 1")
        if config.warmup_blocks < 1:
            fail("warmup_blocks", f"{config.warmup_blocks} must be >= 1")
        if config.sinkhorn_iters < 1:
            fail("sinkhorn_iters", f"{config.sinkhorn_iters} must be >= 1")
        if config.bg_power <= 0:
            fail("bg_power", f"{config.bg_power} must be > 0")
        if not 0.0 < config.box_threshold < 1.0:
            fail("box_threshold", f"{config.box_threshold} must lie in (0, 1)")
        if not 0.0 <= config.refine_start <= 1.0:
            fail("refine_start", f"{config.refine_start} must lie in [0, 1]")
        if config.ignore_band and not config.low_threshold < config.high_threshold:
            fail("low_threshold", "must be below high_threshold when ignore_band is on")
    elif isinstance(config, ParConfig):
        if config.iterations < 1:
            fail("iterations", f"{config.iterations} must be >= 1 (turn PAR off with enabled=false)")
        if not 0.0 < config.scale <= 1.0:
            fail("scale", f"{config.scale} must lie in (0, 1]")
        if not config.dilations or min(config.dilations) < 1:
            fail("dilations", f"{config.dilations} must be a non-empty list of integers >= 1")
    elif isinstance(config, OptimConfig):
        if config.lr <= 0:
            fail("lr", f"{config.lr} must be > 0")
    elif isinstance(config, TrainConfig):
        for name in ("iterations", "batch_size", "accumulation", "val_interval", "log_interval"):
            if getattr(config, name) < 1:
                fail(name, f"{getattr(config, name)} must be >= 1")
    elif isinstance(config, LossConfig):
        if config.lam < 0:
            fail("lam", f"{config.lam} must be >= 0")
    elif isinstance(config, DataConfig):
        if not 0 < config.scale_min <= config.scale_max:
            fail("scale_min", "must satisfy 0 < scale_min <= scale_max")
        if config.crop_size < CROP_MULTIPLE or config.crop_size % CROP_MULTIPLE:
            fail("crop_size", f"{config.crop_size} must be a positive multiple of {CROP_MULTIPLE}")


def to_dict(config: Any) -> dict:
    """A plain nested dict (YAML/JSON-ready) of a config dataclass."""
    return dataclasses.asdict(config)


def from_dict(values: dict) -> Config:
    """Build a validated `Config` from a (possibly partial) nested dict."""
    if not isinstance(values, dict):
        raise ConfigError(f"config must be a mapping, got {type(values).__name__}")
    return _build(Config, values)


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


ENV_PATTERN = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


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


PACKAGED_CONFIGS = Path(__file__).parent / "configs"


def packaged_config(name: str) -> Path:
    """Path of a configuration shipped with the package (`demo`, `voc`)."""
    path = PACKAGED_CONFIGS / f"{name}.yaml"
    if not path.is_file():
        choices = ", ".join(sorted(p.stem for p in PACKAGED_CONFIGS.glob("*.yaml")))
        raise ConfigError(f"no packaged config {name!r}; choose one of {choices}")
    return path


def preset_overrides(name: str) -> list[str]:
    """A packaged preset (configs/presets/<name>.yaml, e.g. `reference`) as `key.sub=value` overrides."""
    path = PACKAGED_CONFIGS / "presets" / f"{name}.yaml"
    if not path.is_file():
        choices = ", ".join(sorted(p.stem for p in path.parent.glob("*.yaml")))
        raise ConfigError(f"no preset {name!r}; choose one of {choices}")

    def leaves(values: dict, prefix: str) -> list[str]:  # JSON values are YAML: parse_override reads them back
        lines = []
        for key, value in values.items():
            dotted = f"{prefix}{key}"
            lines += leaves(value, f"{dotted}.") if isinstance(value, dict) else [f"{dotted}={json.dumps(value)}"]
        return lines

    return leaves(read_yaml(path), "")


def save_config(config: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
