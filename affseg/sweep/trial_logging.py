"""What a trial logs into its MLflow child run at each hook of training (`MlflowCallback`)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

from affseg.callbacks import Callback, TrainResult, ValidationResult
from affseg.config import Config
from affseg.sweep.tracking import (
    BEST_MIOU, CHECKPOINT_DIR, FIGURES_DIR, PER_CLASS_TABLE, RETRY_ATTEMPTS, RETRYABLE, START_ITERATION, VAL_MIOU,
    TrackingRef, child_run, read_table, retrying, set_state, to_metrics,
)

log = logging.getLogger(__name__)


class MlflowCallback(Callback):
    """Logs one trial into its child run: params, losses and lr, validation metrics, the per-class IoU
    table, figures, the best checkpoint, and `state` = completed | pruned | failed.

    Every tracking call is retried (`retrying`); one that still fails is logged as a warning and training
    goes on. Each validation iteration is logged once, also when a resumed trial validates it again."""

    def __init__(self, ref: TrackingRef, trial_number: int, config: Config | None, params: dict | None = None):
        self.ref, self.trial_number, self.config, self.params = ref, trial_number, config, params
        self.client = ref.client()
        self._run_id: str | None = None
        self._metric_steps: set[int] | None = None  # steps of `val/miou` already in the run
        self._table_iterations: set[int] | None = None  # iterations already in PER_CLASS_TABLE

    @property
    def run_id(self) -> str:
        if self._run_id is None:
            self._run_id = retrying(child_run, self.ref, self.trial_number, self.config, self.params)
        return self._run_id

    def _call(self, method: str, *args: object, **kwargs: object) -> object:
        return retrying(getattr(self.client, method), *args, **kwargs)

    def _guarded(self, iteration: int, action: Callable[[], None]) -> None:
        """Run `action`; a tracking error that outlasted its retries becomes a one-line warning."""
        try:
            action()
        except RETRYABLE as error:
            log.warning("MLflow logging failed after %d attempts at iteration %d: %s; training continues",
                        RETRY_ATTEMPTS, iteration, f"{type(error).__name__}: {error}".splitlines()[0])

    def on_start(self, config: object, start_iteration: int) -> None:
        def start() -> None:
            self._call("update_run", self.run_id, status="RUNNING")
            retrying(set_state, self.client, self.run_id, "running")
            self._call("log_batch", self.run_id, metrics=to_metrics({START_ITERATION: start_iteration}, start_iteration))
        self._guarded(start_iteration, start)

    def on_log(self, iteration: int, values: dict[str, float]) -> None:
        self._guarded(iteration, lambda: self._call("log_batch", self.run_id, metrics=to_metrics(values, iteration)))

    def _logged_steps(self) -> set[int]:
        """Steps of `val/miou` the run already holds (read once: a resumed trial validates some again)."""
        if self._metric_steps is None:
            history = self._call("get_metric_history", self.run_id, VAL_MIOU)
            self._metric_steps = {m.step for m in history}
        return self._metric_steps

    def _tabled_iterations(self) -> set[int]:
        """Iterations PER_CLASS_TABLE already holds (read once)."""
        if self._table_iterations is None:
            folder, name = os.path.split(PER_CLASS_TABLE)
            names = {Path(a.path).name for a in self._call("list_artifacts", self.run_id, folder)}
            table = retrying(read_table, self.client, self.run_id, PER_CLASS_TABLE) if name in names else None
            self._table_iterations = set() if table is None else {int(i) for i in table["iteration"]}
        return self._table_iterations

    def on_validation(self, result: ValidationResult, checkpoint: Path, is_best: bool) -> None:
        def validate() -> None:
            if result.iteration not in self._logged_steps():
                metrics = result.metrics() | ({BEST_MIOU: result.miou} if is_best else {})
                self._call("log_batch", self.run_id, metrics=to_metrics(metrics, result.iteration))
                self._metric_steps.add(result.iteration)
            if result.iteration not in self._tabled_iterations():
                table = result.per_class.assign(iteration=result.iteration)[["iteration", "class", "iou"]]
                self._call("log_table", self.run_id, table, PER_CLASS_TABLE)
                self._table_iterations.add(result.iteration)
            for path in result.figures.values():  # same name again: replaced, not duplicated
                self._call("log_artifact", self.run_id, str(path), FIGURES_DIR)
        self._guarded(result.iteration, validate)

    def on_end(self, result: TrainResult) -> None:
        def end() -> None:
            if result.best_checkpoint is not None and Path(result.best_checkpoint).is_file():
                self._call("log_artifact", self.run_id, str(result.best_checkpoint), CHECKPOINT_DIR)
            retrying(set_state, self.client, self.run_id, "pruned" if result.stopped_early else "completed")
        self._guarded(result.iterations_done, end)

    def mark_failed(self, error: BaseException) -> None:
        """Called by the trainable when training raised."""
        self._guarded(-1, lambda: retrying(set_state, self.client, self.run_id, "failed",
                                           f"{type(error).__name__}: {error}"))
