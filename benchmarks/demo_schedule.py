"""Train one configuration on the demo set with the demo sweep profile's schedule (shared by the
benchmarks that compare whole trainings: feature_stages.py, weak_full.py)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from affseg.callbacks import TrainResult
from affseg.config import load_config, packaged_config
from affseg.train import train

# sweeps/profiles/demo.yaml's schedule: 64 iterations, a validation every 8, 40 val images, 16 pseudo images
DEMO_SCHEDULE = ("train.iterations=64", "train.val_interval=8", "train.batch_size=4", "train.accumulation=1",
                 "train.log_interval=16", "optim.warmup_iters=8", "data.val_limit=40", "data.pseudo_subset=16")


def train_on_demo(overrides: list[str], seed: int = 0) -> TrainResult:
    """Train the packaged demo config with `overrides` on the demo schedule; the result of its run."""
    with tempfile.TemporaryDirectory() as out:
        config = load_config(packaged_config("demo"), [*DEMO_SCHEDULE, f"train.seed={seed}",
                                                        f"train.out_dir={Path(out) / 'run'}", *overrides])
        return train(config)


def last_validation(result: TrainResult) -> dict[str, float]:
    """Decoder val mIoU and the pseudo-label mIoUs of the final validation, in %."""
    final = result.history[-1]
    return {"val/miou": 100 * final.miou, **{f"pseudo/{k}": 100 * v for k, v in final.pseudo.items()}}
