"""A callback that prints one line per log step and per validation (the CLI's progress display)."""

from __future__ import annotations

import sys
from pathlib import Path

from affseg.callbacks import Callback, TrainResult, ValidationResult


class PrintProgress(Callback):
    def __init__(self, total_iterations: int, stream=sys.stdout):
        self.total, self.stream = total_iterations, stream

    def _print(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def on_start(self, config, start_iteration: int) -> None:
        where = f"resuming at iteration {start_iteration}" if start_iteration else "starting"
        self._print(f"{where}: {config.model.encoder} on {config.data.root}, {self.total} iterations")

    def on_log(self, iteration: int, values: dict[str, float]) -> None:
        self._print(
            f"iter {iteration:>6}/{self.total}  loss {values['loss']:.4f} (seg {values['loss/seg']:.4f}, "
            f"aff {values['loss/aff']:.4f})  lr {values['lr']:.2e}  {values['sec_per_iter']:.2f} s/it"
        )

    def on_validation(self, result: ValidationResult, checkpoint: Path, is_best: bool) -> None:
        pseudo = "  ".join(f"{k} {100 * v:.1f}" for k, v in result.pseudo.items())
        star = " *best*" if is_best else ""
        self._print(
            f"val @ {result.iteration}: mIoU {100 * result.miou:.1f}  pAcc {100 * result.pixel_acc:.1f}  "
            f"mAcc {100 * result.mean_acc:.1f} | pseudo-label mIoU: {pseudo}{star}"
        )

    def on_end(self, result: TrainResult) -> None:
        if result.best is not None:
            self._print(f"best val mIoU {100 * result.best.miou:.1f} at iteration {result.best.iteration}; "
                        f"checkpoint {result.best_checkpoint}")
