"""What the sweep driver writes into MLflow at the end: every child run's state synced with Optuna's outcome,
and the parent's summary (trials table, curves figure, best trial, savings)."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from mlflow.entities import RunTag
from mlflow.tracking import MlflowClient

from affseg.sweep.tracking import (
    BEST_PREFIX, CURVES_FIGURE, ROLE_TAG, SAVINGS_TABLE, STATE_TAG, SWEEP_TAG, TRIAL_TAG, TRIALS_TABLE, TrackingRef,
    find_runs, replace_table, retrying, run_label, set_state, to_metrics,
)


@dataclass
class TrialRecord:
    """One trial as the sweep summary sees it (Optuna's outcome, MLflow's run)."""

    number: int
    state: str  # completed | pruned | failed | running
    value: float | None  # the objective (best sweep metric) when completed, last value when pruned
    params: dict
    run_id: str | None
    pseudo: dict[str, float] = field(default_factory=dict)  # pseudo-label mIoU (cam, cam_par, refined) at its best


def child_runs(client: MlflowClient, experiment_id: str, sweep: str) -> dict[int, object]:
    """Optuna trial number → child run (the first one when, against the rules, there are several)."""
    runs: dict[int, object] = {}
    for run in find_runs(client, experiment_id, {SWEEP_TAG: sweep, ROLE_TAG: "trial"}):
        runs.setdefault(int(run.data.tags[TRIAL_TAG]), run)
    return runs


def sync_states(client: MlflowClient, records: list[TrialRecord]) -> None:
    """Make every child run's state tag and name agree with Optuna's outcome (covers trials whose worker died)."""
    for record in records:
        if record.run_id is None or record.state == "running":
            continue
        client.update_run(record.run_id, name=run_label(record.number, record.state, record.params))
        run = client.get_run(record.run_id)
        if run.data.tags.get(STATE_TAG) != record.state or run.info.status == "RUNNING":
            set_state(client, record.run_id, record.state)


def finish_parent(client: MlflowClient, ref: TrackingRef, records: list[TrialRecord], metric: str,
                  best: TrialRecord | None, state: str = "completed") -> None:
    """Log the trials table, the curves figure and the best trial onto the parent run, and close it with
    `state` (completed, or interrupted when the budget is not spent)."""
    rows = [{"trial": r.number, "state": r.state, "objective": r.value, **r.pseudo, "run_id": r.run_id or "",
             **{k: str(v) for k, v in r.params.items()}} for r in records]
    if rows:
        replace_table(client, ref.parent_run_id, pd.DataFrame(rows), TRIALS_TABLE)
    curves = {r.number: client.get_metric_history(r.run_id, metric) for r in records if r.run_id}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / CURVES_FIGURE
        plot_curves({n: [(m.step, m.value) for m in h] for n, h in curves.items()},
                    {r.number: r.state for r in records}, metric, path)
        client.log_artifact(ref.parent_run_id, str(path))
    if best is not None:
        tags = [RunTag(f"{BEST_PREFIX}{k}", str(v)) for k, v in best.params.items()]
        tags += [RunTag("best_trial", str(best.number)), RunTag("best_run_id", best.run_id or "")]
        client.log_batch(ref.parent_run_id, metrics=to_metrics({f"best/{metric}": best.value}, 0), tags=tags)
    set_state(client, ref.parent_run_id, state)


def log_savings(client: MlflowClient, parent_run_id: str, savings) -> None:
    """The `savings/*` metrics and the savings table (`affseg.sweep.savings`) on the parent run."""
    retrying(client.log_batch, parent_run_id, metrics=to_metrics(savings.metrics(), 0))
    replace_table(client, parent_run_id, savings.table(), SAVINGS_TABLE)


STATE_COLOURS = {"completed": "tab:blue", "pruned": "tab:orange", "failed": "tab:red", "running": "tab:gray"}


def plot_curves(curves: dict[int, list[tuple[int, float]]], states: dict[int, str], metric: str, path: Path) -> None:
    """One line per trial: `metric` against training iteration, coloured by final state."""
    from matplotlib.figure import Figure  # object API: no pyplot state, no backend switch

    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    for number, points in sorted(curves.items()):
        if not points:
            continue
        steps, values = zip(*sorted(points))
        ax.plot(steps, values, marker="o", markersize=3, color=STATE_COLOURS[states.get(number, "running")], alpha=0.8)
        ax.annotate(str(number), (steps[-1], values[-1]), fontsize=7)
    for state, colour in STATE_COLOURS.items():
        ax.plot([], [], color=colour, label=state)
    ax.set_xlabel("iteration")
    ax.set_ylabel(metric)
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
