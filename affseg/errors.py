"""The errors a user can cause (bad config, missing data, wrong checkpoint): printed as one line by the CLI."""

from __future__ import annotations

from affseg.config import ConfigError
from affseg.data.voc import DatasetError

USER_ERRORS: tuple[type[Exception], ...] = (ConfigError, DatasetError, FileNotFoundError)
