"""Checkpoint I/O: atomic writes, a format version, only finite tensors, one-line errors."""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import torch

LAST_CHECKPOINT = "last.pt"
BEST_CHECKPOINT = "best.pt"
CHECKPOINT_FORMAT = 1
FINITE_KEYS = ("decoder", "optimiser", "scaler")  # the floating state a checkpoint must hold finite


class TrainingError(RuntimeError):
    """Training cannot go on (too many non-finite losses, a checkpoint that does not fit)."""


def save_checkpoint(path: Path, state: dict) -> None:
    """Write atomically (temp file + rename): a killed process never leaves a torn checkpoint."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | Path) -> dict:
    """A training checkpoint as a dict; one-line TrainingError when unreadable or not ours."""
    path = Path(path)
    if not path.is_file():
        raise TrainingError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for torn or foreign files
        raise TrainingError(f"{path}: unreadable checkpoint ({type(err).__name__}: {str(err)[:80]})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise TrainingError(f"{path}: not an affseg training checkpoint")
    return state


def nonfinite_entry(state: object, key: str = "") -> str | None:
    """Dotted key of the first floating tensor or float in a (nested) state holding NaN/inf; None if all finite."""
    if isinstance(state, torch.Tensor):
        return key if state.is_floating_point() and not bool(torch.isfinite(state).all()) else None
    if isinstance(state, float):
        return None if math.isfinite(state) else key
    if isinstance(state, dict):
        items = state.items()
    elif isinstance(state, (list, tuple)):
        items = enumerate(state)
    else:
        return None
    for name, value in items:
        found = nonfinite_entry(value, f"{key}.{name}" if key else str(name))
        if found is not None:
            return found
    return None


def require_finite(state: dict, path: Path) -> None:
    """One-line TrainingError instead of writing a checkpoint with a NaN/inf tensor."""
    found = nonfinite_entry({k: state[k] for k in FINITE_KEYS})
    if found is not None:
        raise TrainingError(f"{path}: refusing to write a checkpoint with non-finite {found}; lower optim.lr")


def writable_folder(folder: Path) -> Path:
    """`folder`, created if needed and probed with a temporary file: checkpoints must be writable before an hour
    of training, not after. TrainingError (one line, naming the folder) otherwise."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise TrainingError(f"{folder}: cannot write there ({err.strerror or type(err).__name__}); "
                            "set train.out_dir (affseg train --out) to a writable folder") from None
    return folder
