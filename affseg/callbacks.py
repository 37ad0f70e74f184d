"""The contract between the training loop and whoever watches it (CLI printer, Ray Tune, MLflow).

The loop never imports Ray or MLflow: it calls these hooks, and a hook may ask it to stop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd


@dataclass
class ValidationResult:
    """One validation pass at a given iteration.

    `confusion` is the (21, 21) matrix, rows = truth, columns = prediction.
    `per_class` has columns `class`, `iou` (NaN for classes absent from truth and prediction).
    `pseudo` holds pseudo-label quality mIoU on the fixed train subset: keys `cam`, `cam_par`, `refined`.
    `figures` maps a file name (e.g. "confusion.png") to a PNG file written by the loop.
    """

    iteration: int
    miou: float
    pixel_acc: float
    mean_acc: float
    per_class: pd.DataFrame
    confusion: np.ndarray
    pseudo: dict[str, float] = field(default_factory=dict)
    figures: dict[str, Path] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """Plain containers only (checkpoint-safe under `torch.load(weights_only=True)`); figures dropped."""
        return {
            "iteration": self.iteration, "miou": self.miou, "pixel_acc": self.pixel_acc, "mean_acc": self.mean_acc,
            "classes": list(self.per_class["class"]), "iou": [float(v) for v in self.per_class["iou"]],
            "confusion": self.confusion.tolist(), "pseudo": dict(self.pseudo),
        }

    @classmethod
    def from_dict(cls, values: dict) -> "ValidationResult":
        return cls(
            iteration=values["iteration"], miou=values["miou"], pixel_acc=values["pixel_acc"],
            mean_acc=values["mean_acc"], per_class=pd.DataFrame({"class": values["classes"], "iou": values["iou"]}),
            confusion=np.asarray(values["confusion"], dtype=np.int64), pseudo=dict(values["pseudo"]),
        )

    def metrics(self) -> dict[str, float]:
        """Flat scalar metrics: val/miou, val/pixel_acc, val/mean_acc, iou/<class>, pseudo/<kind>."""
        values = {"val/miou": self.miou, "val/pixel_acc": self.pixel_acc, "val/mean_acc": self.mean_acc}
        for name, iou in zip(self.per_class["class"], self.per_class["iou"]):
            if not np.isnan(iou):
                values[f"iou/{name}"] = float(iou)
        values.update({f"pseudo/{kind}": value for kind, value in self.pseudo.items()})
        return values


@dataclass
class TrainResult:
    """What `train()` returns: the best validation, where its checkpoint is, and how the run ended."""

    best: ValidationResult | None
    best_checkpoint: Path | None
    last_checkpoint: Path | None
    iterations_done: int
    stopped_early: bool
    history: list[ValidationResult] = field(default_factory=list)


class Callback:
    """Base class: override what you need. All hooks are called in the training process."""

    def on_start(self, config: object, start_iteration: int) -> None:
        """Called once before the first step (start_iteration > 0 after a resume)."""

    def on_log(self, iteration: int, values: dict[str, float]) -> None:
        """Losses, lr and timing every `train.log_interval` iterations."""

    def on_validation(self, result: ValidationResult, checkpoint: Path, is_best: bool) -> None:
        """After each validation; `checkpoint` holds the full training state at `result.iteration`."""

    def should_stop(self) -> bool:
        """Return True to end training early (pruning); checked after every validation."""
        return False

    def on_end(self, result: TrainResult) -> None:
        """Called once when training finishes, stops early, or fails (then result.best may be None)."""
