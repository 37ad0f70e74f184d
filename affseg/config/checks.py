"""Range checks that types alone cannot express: `validate(section, prefix)` raises the first problem.

Each check yields `(key, message)` problems of one section; the message is one line and says what is allowed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from affseg.config.schema import (
    CROP_MULTIPLE,
    SWIN_STAGES,
    ConfigError,
    DataConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    ParConfig,
    RefineConfig,
    TrainConfig,
)

Problems = Iterator[tuple[str, str]]

REFINE_COUNTS = {  # RefineConfig keys that must be >= 1 → the rest of their message
    "alpha": "must be an integer >= 1",
    "n0": "must be >= 1",
    "warmup_blocks": "must be >= 1",
    "sinkhorn_iters": "must be >= 1",
}
TRAIN_COUNTS = ("iterations", "batch_size", "accumulation", "val_interval", "log_interval")  # TrainConfig: >= 1


def _refine(config: RefineConfig) -> Problems:
    for name, rule in REFINE_COUNTS.items():
        if getattr(config, name) < 1:
            yield name, f"{getattr(config, name)} {rule}"
    if config.bg_power <= 0:
        yield "bg_power", f"{config.bg_power} must be > 0"
    if not 0.0 < config.box_threshold < 1.0:
        yield "box_threshold", f"{config.box_threshold} must lie in (0, 1)"
    if not 0.0 <= config.refine_start <= 1.0:
        yield "refine_start", f"{config.refine_start} must lie in [0, 1]"
    if config.ignore_band and not config.low_threshold < config.high_threshold:
        yield "low_threshold", "must be below high_threshold when ignore_band is on"


def _par(config: ParConfig) -> Problems:
    if config.iterations < 1:
        yield "iterations", f"{config.iterations} must be >= 1 (turn PAR off with enabled=false)"
    if not 0.0 < config.scale <= 1.0:
        yield "scale", f"{config.scale} must lie in (0, 1]"
    if not config.dilations or min(config.dilations) < 1:
        yield "dilations", f"{config.dilations} must be a non-empty list of integers >= 1"


def _stages(key: str, stages: list[int]) -> Problems:
    """A list of Swin stages: non-empty, each in 1..SWIN_STAGES, none twice."""
    outside = [stage for stage in stages if not 1 <= stage <= SWIN_STAGES]
    if not stages:
        yield key, f"[] must list at least one Swin stage (1-{SWIN_STAGES})"
    elif outside:
        yield key, f"{outside[0]} is not a Swin stage; use 1-{SWIN_STAGES}"
    elif len(set(stages)) < len(stages):
        yield key, f"{stages} lists a stage twice; list each stage once"


def _model(config: ModelConfig) -> Problems:
    yield from _stages("decoder_stages", config.decoder_stages)
    yield from _stages("affinity_stages", config.affinity_stages)
    if not 0.0 <= config.decoder_dropout < 1.0:
        yield "decoder_dropout", f"{config.decoder_dropout} must lie in [0, 1)"


def _optim(config: OptimConfig) -> Problems:
    if config.lr <= 0:
        yield "lr", f"{config.lr} must be > 0"


def _train(config: TrainConfig) -> Problems:
    for name in TRAIN_COUNTS:
        if getattr(config, name) < 1:
            yield name, f"{getattr(config, name)} must be >= 1"


def _loss(config: LossConfig) -> Problems:
    if config.lam < 0:
        yield "lam", f"{config.lam} must be >= 0"


def _data(config: DataConfig) -> Problems:
    if not 0 < config.scale_min <= config.scale_max:
        yield "scale_min", "must satisfy 0 < scale_min <= scale_max"
    if config.crop_size < CROP_MULTIPLE or config.crop_size % CROP_MULTIPLE:
        yield "crop_size", f"{config.crop_size} must be a positive multiple of {CROP_MULTIPLE}"


CHECKS: dict[type, Callable[[Any], Problems]] = {
    RefineConfig: _refine,
    ParConfig: _par,
    ModelConfig: _model,
    OptimConfig: _optim,
    TrainConfig: _train,
    LossConfig: _loss,
    DataConfig: _data,
}


def validate(config: Any, prefix: str = "") -> None:
    """Raise a one-line ConfigError `prefix.key: message` for the first problem of this section, if any."""
    check = CHECKS.get(type(config))
    for key, message in check(config) if check else ():
        raise ConfigError(f"{prefix}.{key}: {message}" if prefix else f"{key}: {message}")
