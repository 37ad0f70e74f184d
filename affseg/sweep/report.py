"""What a sweep shows: one progress line per trial event (`ProgressPrinter`), the final `SweepSummary`
(best trial, trials table, per-class view, savings) and the driver-side readings of Optuna and Ray behind it.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import optuna
import pandas as pd
from ray import tune

from affseg.sweep import analysis
from affseg.sweep.analysis import PSEUDO_PREFIX
from affseg.sweep.groups import members_of
from affseg.sweep.pruning import OBJECTIVE_KEY, PRUNED_KEY, member_key
from affseg.sweep.savings import TIME_KEY, RayTrial, Savings, sweep_savings
from affseg.sweep.sweep_results import TrialRecord
from affseg.sweep.tracking import CURVES_FIGURE, UI_BASE, retrying, ui_link
from affseg.sweep.trial import ITERATION_KEY

UI_COMMAND = "make mlflow-ui"
STATE_NAMES = {
    optuna.trial.TrialState.COMPLETE: "completed", optuna.trial.TrialState.PRUNED: "pruned",
    optuna.trial.TrialState.FAIL: "failed", optuna.trial.TrialState.RUNNING: "running",
    optuna.trial.TrialState.WAITING: "running",
}


class ProgressPrinter(tune.Callback):
    """One line per trial event: start (params), each validation, and the final state."""

    def __init__(self, metric: str):
        self.metric = metric
        self.ended: set[int] = set()  # members of fused groups already reported pruned

    @staticmethod
    def _print(text: str) -> None:
        print(text, flush=True)

    @staticmethod
    def _members(trial) -> list[tuple[int, Callable[[str], str]]]:
        """(Optuna number, result key of that member) for each trial a Ray trial trains."""
        if "members" not in trial.config:
            return [(trial.config["optuna_trial"], lambda key: key)]
        return [(m["optuna_trial"], lambda key, n=m["optuna_trial"]: member_key(n, key))
                for m in trial.config["members"]]

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        fused = f", fused group {trial.trial_id}" if "members" in trial.config else f" ({trial.trial_id})"
        for member in members_of(trial.config):
            params = ", ".join(f"{k}={_short(v)}" for k, v in member["params"].items())
            self._print(f"trial {member['optuna_trial']:>3}{fused} started: {params}")

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        for number, key in self._members(trial):
            if key(ITERATION_KEY) not in result:
                continue
            pruned = result.get(key(PRUNED_KEY))
            if pruned and "members" in trial.config:
                self.ended.add(number)
            self._print(f"trial {number:>3}  iter {result.get(key(ITERATION_KEY), 0):>6}  "
                        f"{self.metric} {result.get(key(self.metric), float('nan')):.4f}  "
                        f"best {result.get(key(OBJECTIVE_KEY), float('nan')):.4f}{'  -> pruned' if pruned else ''}")

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        result = trial.last_result or {}
        for number, key in self._members(trial):
            if number in self.ended:
                continue
            state = "pruned" if result.get(key(PRUNED_KEY)) else "completed"
            self._print(f"trial {number:>3} {state}: best {self.metric} {result.get(key(OBJECTIVE_KEY), float('nan')):.4f}")

    def on_trial_recover(self, iteration, trials, trial, **info) -> None:
        for number, _ in self._members(trial):
            self._print(f"trial {number:>3} lost its worker or raised; restarting from its last checkpoint")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        text = Path(trial.error_file).read_text() if trial.error_file and Path(trial.error_file).is_file() else ""
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        for number, _ in self._members(trial):
            self._print(f"trial {number:>3} failed: {lines[-1] if lines else 'see the Ray trial folder'}")


def _short(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def trial_dirname(trial) -> str:
    if "members" in trial.config:
        return f"group_{trial.config['members'][0]['optuna_trial']:03d}_{trial.trial_id}"
    return f"trial_{trial.config['optuna_trial']:03d}_{trial.trial_id}"


@dataclass
class SweepSummary:
    """The outcome of a sweep: every trial (Optuna's state, MLflow's run) and the best one."""

    name: str
    path: Path  # the Ray Tune experiment folder
    parent_run_id: str
    experiment_id: str
    metric: str
    trials: list[TrialRecord]
    best: TrialRecord | None
    best_per_class: pd.DataFrame | None  # columns class, iou at the best trial's best validation (present classes)
    interrupted: bool  # stopped (Ctrl-C) before the budget was spent: resume it
    savings: Savings | None = None  # what pruning and fusing saved
    class_report: list[str] = dataclasses.field(default_factory=list)  # per-class IoU and importance tables

    def counts(self) -> dict[str, int]:
        counts = {"completed": 0, "pruned": 0, "failed": 0, "running": 0}
        for record in self.trials:
            counts[record.state] += 1
        return counts

    def _trials_table(self) -> list[str]:
        """Every trial's state, objective and pseudo-label mIoU at its best validation (%), best first."""
        rows = [{"trial": r.number, "state": r.state, self.metric: r.value,
                 **{k.removeprefix(PSEUDO_PREFIX): v for k, v in r.pseudo.items()}} for r in self.trials]
        if not rows:
            return []
        table = pd.DataFrame(rows).sort_values(self.metric, ascending=False, na_position="last")
        numeric = table.select_dtypes("number").columns.drop("trial")
        table[numeric] = (100 * table[numeric]).round(1)
        return ["trials (%; pseudo-label mIoU at each trial's best validation):", table.to_string(index=False)]

    def description(self) -> str:
        """The parent run's description (markdown): the terminal summary and the figures beside it."""
        figures = [CURVES_FIGURE, analysis.IOU_HEATMAP, analysis.IMPORTANCE_HEATMAP]
        return "\n".join(["```", *self.lines(), "```", "Figures (artifacts of this run): " + ", ".join(figures)])

    def lines(self) -> list[str]:
        counts = ", ".join(f"{n} {state}" for state, n in self.counts().items() if n)
        lines = [f"sweep {self.name}: {len(self.trials)} trials ({counts}); Ray results in {self.path}"]
        if self.best is None:
            lines.append("no trial completed")
        else:
            lines.append(f"best trial {self.best.number}: {self.metric} {self.best.value:.4f} "
                         f"(MLflow run {self.best.run_id})")
            lines += [f"  {key} = {_short(value)}" for key, value in self.best.params.items()]
        lines += self._trials_table()
        lines += self.class_report
        if self.savings is not None:
            lines.append(self.savings.line())
        if self.interrupted:
            lines.append(f"interrupted: continue with `make sweep ... RESUME=1` (or run_sweep(..., resume=True, "
                         f"name={self.name!r}))")
        lines.append(f"open the tracking UI with `{UI_COMMAND}`, then {ui_link(UI_BASE, self.experiment_id, self.parent_run_id)}")
        return lines


def log_analysis(client, parent_run_id: str, study: optuna.Study) -> None:
    """The per-class heatmap and the importance table and heatmap on the parent run."""
    with tempfile.TemporaryDirectory() as tmp:
        for path in analysis.write_artifacts(study, Path(tmp)):
            retrying(client.log_artifact, parent_run_id, str(path))


def measure_savings(grid: tune.ResultGrid, study: optuna.Study, total: int, resources: dict[str, float]) -> Savings:
    runs = [RayTrial(tuple(m["optuna_trial"] for m in members_of(r.config)), float((r.metrics or {}).get(TIME_KEY, 0.0)))
            for r in grid if r.config]
    gpu = resources.get("gpu", 0)
    return sweep_savings(study.get_trials(deepcopy=False), runs, total, gpu or resources["cpu"], "GPU" if gpu else "CPU")


def trial_records(study: optuna.Study, runs: dict[int, object], metric: str) -> list[TrialRecord]:
    """Optuna's view of every trial + its MLflow run. A trial that did not complete shows the best `metric` it
    reached (a user attribute: Optuna's own value for a pruned trial is the last pruning signal it read)."""
    return [
        TrialRecord(t.number, STATE_NAMES[t.state],
                    t.value if t.state == optuna.trial.TrialState.COMPLETE else t.user_attrs.get(metric, t.value),
                    dict(t.params),
                    runs[t.number].info.run_id if t.number in runs else None,
                    {k: v for k, v in t.user_attrs.items() if k.startswith(PSEUDO_PREFIX)})
        for t in study.get_trials(deepcopy=False)
    ]


def best_record(records: list[TrialRecord], mode: str) -> TrialRecord | None:
    done = [r for r in records if r.state == "completed" and r.value is not None]
    if not done:
        return None
    return (max if mode == "max" else min)(done, key=lambda r: r.value)


def best_per_class(grid: tune.ResultGrid, best: TrialRecord | None, metric: str, mode: str) -> pd.DataFrame | None:
    """The best trial's per-class IoU at its best validation, from its reported results."""
    if best is None:
        return None
    for result in grid:
        numbers = [m["optuna_trial"] for m in members_of(result.config)] if result.config else []
        if best.number in numbers and result.metrics_dataframe is not None:
            prefix = member_key(best.number, "") if "members" in result.config else ""
            column = prefix + metric
            if column not in result.metrics_dataframe:
                return None
            frame = result.metrics_dataframe.dropna(subset=[column])
            if frame.empty:
                return None
            row = frame.loc[frame[column].idxmax() if mode == "max" else frame[column].idxmin()]
            iou = prefix + "iou/"
            ious = {c[len(iou):]: row[c] for c in frame.columns if c.startswith(iou)}
            return pd.DataFrame({"class": list(ious), "iou": list(ious.values())}).dropna().reset_index(drop=True)
    return None

