"""`train(config, callbacks, resume_from) -> TrainResult`: the one function the sweep layer and the CLI call.

The loop itself lives in `affseg.engine` (teacher pass, heads, hooks); nothing here imports Ray or MLflow:
observers are `affseg.callbacks.Callback`s.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from affseg.callbacks import Callback, TrainResult
from affseg.config import Config
from affseg.engine.trainer import Member, Trainer


def train(config: Config, callbacks: Sequence[Callback] = (), resume_from: str | Path | None = None) -> TrainResult:
    """Train UniCL-AffSeg per `config`; see `affseg.engine.trainer.Trainer`. Resuming continues the schedule
    exactly."""
    return Trainer(config, callbacks, resume_from).run()


def train_fused(members: Sequence[Member]) -> list[TrainResult]:
    """Train K configurations that differ only in fusable keys on one teacher pass per micro-batch
    (SPEC §5.4); one `TrainResult` per member, each as if that member had been trained alone."""
    trainer = Trainer.fused(members)
    trainer.run()
    return trainer.results()
