"""The trial side of a sweep: the Ray Tune trainable (`run_trial`) and its reporter.

One trial = the full training loop with two callbacks (MLflow child run; `TuneReporter`: Tune reports with
a checkpoint, and the Optuna pruner's verdict), resumed from Ray's last checkpoint when its worker died.
A fused group runs through `affseg.sweep.groups.run_group` with the same pieces.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import optuna
from ray import tune

from affseg.callbacks import Callback, ValidationResult
from affseg.config import Config
from affseg.engine.checkpoint import BEST_CHECKPOINT, LAST_CHECKPOINT
from affseg.sweep.analysis import IOU_PREFIX, PSEUDO_PREFIX
from affseg.sweep.pruning import OBJECTIVE_KEY, PRUNED_KEY, StudyRef, TrialLink
from affseg.sweep.spec import SweepSpec
from affseg.sweep.tracking import TrackingRef
from affseg.sweep.trial_logging import MlflowCallback

TRAIN_DIR = "train"  # train.out_dir inside the trial's node-local working folder (removed when it ends)
STAGE_DIR = "tune_checkpoint"  # inside train.out_dir: what each report hands to Ray as its checkpoint
OBJECTIVE_FILE = "objective.json"  # in each Ray checkpoint: the running best, restored with the trial
ITERATION_KEY = "iteration"


@dataclass(frozen=True)
class TrialContext:
    """What every trial needs besides its sampled parameters (picklable)."""

    spec: SweepSpec
    study: StudyRef
    tracking: TrackingRef
    train_fn: Callable | None = None  # None: affseg.train.train; tests pass a synthetic loop
    fused_train_fn: Callable | None = None  # a fused group's loop; None: affseg.train.train_fused


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


class TuneReporter(Callback):
    """Reports every validation to Ray Tune with a checkpoint, and asks the Optuna pruner.

    The verdict is returned by `should_stop()` and reported as `pruned`. Pruning at the final
    validation is not pruning (training ends there anyway), so it is never reported there.
    A member of a fused group hands its report to the group's `sink` (`affseg.sweep.groups.GroupSink`),
    which reports all members of one validation together.
    """

    def __init__(self, link: TrialLink, metric: str, mode: str, out_dir: Path, objective: float | None = None,
                 sink: Callable[["TuneReporter", dict, Path], None] | None = None):
        self.link, self.metric, self.mode, self.out_dir = link, metric, mode, out_dir
        self.objective = objective
        self.sink = sink or _report_alone
        self.total = 0
        self.prune = False

    def on_start(self, config: Config, start_iteration: int) -> None:
        self.total = config.train.iterations

    def on_validation(self, result: ValidationResult, checkpoint: Path, is_best: bool) -> None:
        metrics = result.metrics()
        value = metrics.get(self.metric, float("nan"))
        if self.objective is None or (value > self.objective if self.mode == "max" else value < self.objective):
            self.objective = value
            self.link.record_best({self.metric: value, **{k: v for k, v in metrics.items()
                                                          if k.startswith((IOU_PREFIX, PSEUDO_PREFIX))}})
        signal = metrics.get(self.link.signal or self.metric, float("nan"))  # what the pruner reads
        self.prune = self.link.should_prune(result.iteration, signal) and result.iteration < self.total
        report = {**metrics, ITERATION_KEY: result.iteration, OBJECTIVE_KEY: self.objective,
                  PRUNED_KEY: float(self.prune)}
        self.sink(self, report, checkpoint)

    def stage(self, last: Path, stage: Path | None = None) -> Path:
        """A folder (default `out_dir/STAGE_DIR`) with last.pt, best.pt and the running objective (hard links
        where possible)."""
        stage = stage or self.out_dir / STAGE_DIR
        shutil.rmtree(stage, ignore_errors=True)
        stage.mkdir(parents=True)
        for path in (last, last.parent / BEST_CHECKPOINT):
            if path.is_file():
                _link_or_copy(path, stage / path.name)
        (stage / OBJECTIVE_FILE).write_text(json.dumps({OBJECTIVE_KEY: self.objective}))
        return stage

    def should_stop(self) -> bool:
        return self.prune


def _report_alone(reporter: TuneReporter, report: dict, checkpoint: Path) -> None:
    tune.report(report, checkpoint=tune.Checkpoint.from_directory(str(reporter.stage(checkpoint))))


def _restore(out_dir: Path) -> tuple[Path | None, float | None]:
    """Copy Ray's last checkpoint of this trial (if any) into `out_dir`: (last.pt to resume from, objective)."""
    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return None, None
    checkpoint.to_directory(str(out_dir))
    objective = json.loads((out_dir / OBJECTIVE_FILE).read_text())[OBJECTIVE_KEY]
    return out_dir / LAST_CHECKPOINT, objective


def trial_scratch() -> Path:
    """The trial's node-local working folder. Not `get_trial_dir()`: for a function trainable that is
    the driver staging folder, which Ray re-uploads every few seconds while we write temporaries
    (last.pt.tmp, tune_checkpoint/) into it, logging a FileNotFoundError traceback when one vanishes.
    The working folder is synced only with `SyncConfig(sync_artifacts=True)`, which we never set."""
    return Path(tune.get_context().get_storage().trial_working_directory)


def run_trial(trial_config: dict, context: TrialContext) -> None:
    """The Ray Tune trainable: one training run with the trial's parameters (a fused group: `run_group`)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if "members" in trial_config:
        from affseg.sweep.groups import run_group

        run_group(trial_config["members"], context)
        return
    number = trial_config["optuna_trial"]
    link = TrialLink(context.study, number)
    if link.finished():  # a restored sweep re-queued a trial whose outcome Optuna already has
        return
    out_dir = trial_scratch() / TRAIN_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    tracker = MlflowCallback(context.tracking, number, None, trial_config["params"])
    try:
        config = context.spec.trial_config(trial_config["params"], {"train.out_dir": str(out_dir)})
        tracker.config = config
        resume_from, objective = _restore(out_dir)
        reporter = TuneReporter(link, context.spec.metric, context.spec.mode, out_dir, objective)
        train_fn = context.train_fn
        if train_fn is None:
            from affseg.train import train as train_fn
        train_fn(config, [tracker, reporter], resume_from=resume_from)
    except Exception as err:
        tracker.mark_failed(err)
        raise
    # The trial's folder is node-local scratch: its checkpoints live on in Ray's storage and MLflow.
    shutil.rmtree(out_dir, ignore_errors=True)
