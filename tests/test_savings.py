"""The savings report (SPEC §5.5): trial-iterations, device-seconds and teacher passes against unpruned, unfused."""

from __future__ import annotations

import optuna
import pytest

from affseg.sweep.savings import RayTrial, sweep_savings

TOTAL = 64


def _study(pruned_at: list[int | None]) -> list[optuna.trial.FrozenTrial]:
    study = optuna.create_study()
    for stop in pruned_at:
        trial = study.ask()
        for step in range(8, (stop or TOTAL) + 1, 8):
            trial.report(0.5, step=step)
        if stop is None:
            study.tell(trial, 0.5)
        else:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    return study.get_trials()


def test_pruned_trials_count_at_the_full_schedule_and_groups_share_teacher_passes():
    trials = _study([None, 32, 16])  # trial 0 completes, 1 is pruned at 32, 2 at 16
    runs = [RayTrial((0, 1), seconds=100.0), RayTrial((2,), seconds=30.0)]  # 0 and 1 fused in one group
    savings = sweep_savings(trials, runs, TOTAL, devices=2, device="CPU")
    assert (savings.iterations, savings.iterations_unpruned) == (64 + 32 + 16, 3 * 64)
    assert savings.fraction_saved == pytest.approx(1 - 112 / 192)
    assert savings.device_seconds == pytest.approx(2 * (100 + 30))
    assert savings.device_seconds_unpruned == pytest.approx(2 * 100 + 2 * 30 * 64 / 16)  # the group ran in full
    assert (savings.teacher_passes, savings.teacher_passes_unfused) == (64 + 16, 112)
    metrics = savings.metrics()
    assert metrics["savings/iterations_saved"] == 80 and metrics["savings/teacher_passes_saved"] == 32
    assert "42 % saved by pruning" in savings.line() and "32 teacher passes saved by fusing" in savings.line()
    assert list(savings.table()["quantity"]) == ["trial-iterations", "CPU-seconds", "teacher passes"]
