"""The errors a user can cause (bad config, missing data, wrong checkpoint): printed as one line by the CLI."""

from __future__ import annotations

from affseg.backbones.checkpoint import CheckpointError
from affseg.backbones.demo_weights import MissingWeightsError
from affseg.config import ConfigError
from affseg.data.voc import DatasetError
from affseg.engine.checkpoint import TrainingError

USER_ERRORS: tuple[type[Exception], ...] = (
    ConfigError,
    DatasetError,
    TrainingError,  # missing / unreadable / foreign training checkpoint, resume mismatch
    CheckpointError,  # encoder weights file unreadable or not fitting the encoder
    MissingWeightsError,  # no encoder weights file given and no default exists
    FileNotFoundError,
)
