"""Hooks run by the trainer after every iteration, in order (the detectron2 pattern): logging,
validation, checkpoints, then the heads' callbacks (which may stop a head: pruning)."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from affseg.engine.checkpoint import BEST_CHECKPOINT, LAST_CHECKPOINT, require_finite, save_checkpoint
from affseg.validate import validate_heads

if TYPE_CHECKING:
    from affseg.engine.trainer import Trainer

log = logging.getLogger(__name__)


class Hook:
    """Override what you need; `trainer` exposes `iteration`, `heads`, `step_values` and `validations`."""

    def before_train(self, trainer: Trainer) -> None:
        pass

    def after_step(self, trainer: Trainer) -> None:
        pass

    def after_train(self, trainer: Trainer) -> None:
        pass


class LogHook(Hook):
    """Losses, lr, seconds per iteration and the non-finite count every `train.log_interval` (and at 1)."""

    def before_train(self, trainer: Trainer) -> None:
        self.tick = time.perf_counter()

    def after_step(self, trainer: Trainer) -> None:
        if not trainer.is_log_step():
            return
        elapsed = (time.perf_counter() - self.tick) / max(1, trainer.config.train.log_interval)
        for head, values in trainer.step_values.items():
            if not head.last_step_ok:  # a skipped step has nothing to log (`Trainer.reads_host` read it)
                continue
            values = {**head.read_values(values), "lr": head.optimiser.param_groups[0]["lr"], "sec_per_iter": elapsed,
                      "nonfinite": float(head.nonfinite)}
            for callback in head.callbacks:
                callback.on_log(trainer.iteration, values)
        self.tick = time.perf_counter()


class ValidationHook(Hook):
    """Every `train.val_interval` iterations and at the end: validate the heads still training, on one
    teacher pass per image."""

    def after_step(self, trainer: Trainer) -> None:
        cfg = trainer.config.train
        trainer.validations = {}
        if trainer.iteration % cfg.val_interval and trainer.iteration != cfg.iterations:
            return
        heads = trainer.active_heads()
        results = validate_heads(trainer.teacher, [(h.student, h.labeler, h.out_dir / "figures") for h in heads],
                                 trainer.val_set, trainer.pseudo_set, trainer.iteration, trainer.runtime)
        for head, result in zip(heads, results):
            is_best = head.best is None or result.miou > head.best.miou
            if is_best:
                head.best = result
            head.history.append(result)
            trainer.validations[head] = is_best


class CheckpointHook(Hook):
    """After each validation: `last.pt` (and `best.pt` when it is the best so far), finite tensors only."""

    def after_step(self, trainer: Trainer) -> None:
        for head, is_best in trainer.validations.items():
            state = head.state(trainer.iteration)
            require_finite(state, head.out_dir / LAST_CHECKPOINT)
            save_checkpoint(head.out_dir / LAST_CHECKPOINT, state)
            if is_best:
                save_checkpoint(head.out_dir / BEST_CHECKPOINT, state)


class CallbackHook(Hook):
    """The heads' `Callback`s: start, each validation (a head stops when one asks), end."""

    def before_train(self, trainer: Trainer) -> None:
        for head in trainer.heads:
            for callback in head.callbacks:
                callback.on_start(head.config, trainer.iteration)

    def after_step(self, trainer: Trainer) -> None:
        for head in trainer.validations:
            for callback in head.callbacks:
                callback.on_validation(head.history[-1], head.out_dir / LAST_CHECKPOINT, trainer.validations[head])
            wants_stop = any(callback.should_stop() for callback in head.callbacks)
            head.stopped = wants_stop and trainer.iteration < trainer.config.train.iterations

    def after_train(self, trainer: Trainer) -> None:
        for head, result in zip(trainer.heads, trainer.results()):
            for callback in head.callbacks:
                callback.on_end(result)


DEFAULT_HOOKS = (LogHook, ValidationHook, CheckpointHook, CallbackHook)
