"""What pruning (and fusing) saved in a sweep (SPEC §5.5): trial-iterations, device-seconds and teacher passes
trained, against the same trials unpruned (each pruned trial counted at the full schedule) and unfused.

Trial-iterations come from Optuna (a pruned trial's last reported step; a completed one ran the schedule).
Device-seconds come from Ray: each Ray trial's `time_total_s` times the devices it held (its GPU, else its
CPUs); unpruned, a Ray trial would have run the whole schedule at the same seconds per iteration. A fused
group is one Ray trial: it runs as long as its longest member, and one teacher pass per iteration serves
all its members (alone, each member pays its own).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import optuna
import pandas as pd

TIME_KEY = "time_total_s"  # Ray's wall seconds of a trial, in every result


@dataclass(frozen=True)
class RayTrial:
    """One Ray trial of the sweep: the Optuna trials it trained and its wall seconds."""

    numbers: tuple[int, ...]
    seconds: float


@dataclass(frozen=True)
class Savings:
    iterations: int  # trial-iterations trained
    iterations_unpruned: int
    device_seconds: float
    device_seconds_unpruned: float
    teacher_passes: int  # iterations of teacher work done (a fused group shares one per iteration)
    teacher_passes_unfused: int  # what every trial alone would have done (= iterations)
    device: str  # "GPU" or "CPU": what a device-second is

    @property
    def fraction_saved(self) -> float:
        return 1 - self.iterations / self.iterations_unpruned if self.iterations_unpruned else 0.0

    def metrics(self) -> dict[str, float]:
        return {
            "savings/iterations_saved": float(self.iterations_unpruned - self.iterations),
            "savings/device_seconds_saved": self.device_seconds_unpruned - self.device_seconds,
            "savings/fraction_saved": self.fraction_saved,
            "savings/teacher_passes_saved": float(self.teacher_passes_unfused - self.teacher_passes),
        }

    def table(self) -> pd.DataFrame:
        return pd.DataFrame({
            "quantity": ["trial-iterations", f"{self.device}-seconds", "teacher passes"],
            "trained": [self.iterations, round(self.device_seconds, 1), self.teacher_passes],
            "unpruned, unfused": [self.iterations_unpruned, round(self.device_seconds_unpruned, 1),
                                  self.iterations_unpruned],
        })

    def line(self) -> str:
        text = (f"savings: {self.iterations} of {self.iterations_unpruned} trial-iterations trained "
                f"({100 * self.fraction_saved:.0f} % saved by pruning), {self.device_seconds:.0f} of "
                f"{self.device_seconds_unpruned:.0f} {self.device}-seconds")
        if self.teacher_passes < self.teacher_passes_unfused:
            text += f"; {self.teacher_passes_unfused - self.teacher_passes} teacher passes saved by fusing"
        return text


def trained_iterations(trial: optuna.trial.FrozenTrial, total: int) -> int:
    """Iterations a trial trained: the schedule when it completed, else its last reported step."""
    if trial.state == optuna.trial.TrialState.COMPLETE:
        return total
    return max(trial.intermediate_values, default=0)


def sweep_savings(trials: Sequence[optuna.trial.FrozenTrial], ray_trials: Sequence[RayTrial], total: int,
                  devices: float, device: str) -> Savings:
    """`trials`: the study's trials; `ray_trials`: who trained them and for how long; `total`: the schedule's
    iterations; `devices`: devices a Ray trial holds (1 GPU, or its CPUs)."""
    done = {t.number: trained_iterations(t, total) for t in trials}
    iterations = sum(done.values())
    seconds = unpruned_seconds = 0.0
    passes = 0
    for ray_trial in ray_trials:
        ran = max((done.get(n, 0) for n in ray_trial.numbers), default=0)
        passes += ran
        seconds += ray_trial.seconds * devices
        unpruned_seconds += ray_trial.seconds * devices * (total / ran if ran else 1.0)
    return Savings(iterations, total * len(done), seconds, unpruned_seconds, passes, iterations, device)
