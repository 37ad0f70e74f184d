"""Per-class view of a sweep (SPEC §5.5): which trial is good at which class, and which knob moves which class.

Every trial stores the per-class IoU of its best validation as Optuna user attributes `iou/<class>`
(`TrialLink.record_best`). From the completed trials:
- a heatmap of per-class IoU, classes × the top-k trials (best first): `per_class_iou_heatmap.png`;
- a hyperparameter-importance table (fANOVA, `optuna.importance.get_param_importances(..., target=...)`)
  on the objective (`mean`) and on each class's IoU: `importance_per_class.csv`, `importance_heatmap.png`.
  A conditional parameter (e.g. bg_power, only with background=power) is scored on the trials where it
  is active, in its own fANOVA; so its importances share no common scale with the unconditional ones.
Below `MIN_TRIALS` completed trials there is no importance table: `too few completed trials`; a target that
does not vary over the trials (a class no trial segments) has no importances (NaN).
"""

from __future__ import annotations

from pathlib import Path

import optuna
import pandas as pd

IOU_PREFIX = "iou/"
PSEUDO_PREFIX = "pseudo/"
MIN_TRIALS = 4  # fANOVA on fewer completed trials says nothing
TOP_TRIALS = 8  # trials in the per-class heatmap
FANOVA_SEED = 0
TOO_FEW = "too few completed trials"
IOU_HEATMAP = "per_class_iou_heatmap.png"
IMPORTANCE_TABLE = "importance_per_class.csv"
IMPORTANCE_HEATMAP = "importance_heatmap.png"


def completed(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Completed trials, best first (by the study's direction)."""
    done = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))]
    return sorted(done, key=lambda t: t.value, reverse=study.direction == optuna.study.StudyDirection.MAXIMIZE)


def class_names(trials: list[optuna.trial.FrozenTrial]) -> list[str]:
    """Classes with an IoU in any trial, in the order the first trial recorded them (VOC order)."""
    names: dict[str, None] = {}
    for trial in trials:
        names.update({key[len(IOU_PREFIX):]: None for key in trial.user_attrs if key.startswith(IOU_PREFIX)})
    return list(names)


def per_class_iou(study: optuna.Study, top: int = TOP_TRIALS) -> pd.DataFrame:
    """IoU (%) per class (rows) of the `top` best completed trials (columns `trial <n>`, best first)."""
    trials = completed(study)[:top]
    classes = class_names(trials)
    return pd.DataFrame({f"trial {t.number}": [100 * t.user_attrs.get(f"{IOU_PREFIX}{c}", float("nan")) for c in classes]
                         for t in trials}, index=pd.Index(classes, name="class"))


def _importances(trials: list[optuna.trial.FrozenTrial], direction, target) -> dict[str, float]:
    """Normalised fANOVA importances; {} (NaN in the table) when the target does not vary (e.g. a class
    that no trial ever segments), where importance is undefined."""
    values = [target(t) for t in trials]
    if max(values) == min(values):
        return {}
    study = optuna.create_study(direction=direction)
    study.add_trials(trials)
    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=FANOVA_SEED)
    return optuna.importance.get_param_importances(study, evaluator=evaluator, target=target, normalize=True)


def importance_per_class(study: optuna.Study) -> pd.DataFrame | None:
    """fANOVA importance of each parameter (rows) for the objective (`mean`) and each class (columns);
    None below MIN_TRIALS completed trials."""
    trials = completed(study)
    if len(trials) < MIN_TRIALS:
        return None
    targets = {"mean": lambda t: t.value}
    targets.update({c: (lambda t, c=c: t.user_attrs.get(f"{IOU_PREFIX}{c}", 0.0)) for c in class_names(trials)})
    everywhere = set.intersection(*(set(t.params) for t in trials))
    conditional = sorted(set().union(*(set(t.params) for t in trials)) - everywhere)
    columns = {}
    for name, target in targets.items():
        scores = _importances(trials, study.direction, target) if everywhere else {}
        for key in conditional:
            active = [t for t in trials if key in t.params]
            if len(active) >= MIN_TRIALS:
                scores[key] = _importances(active, study.direction, target).get(key, float("nan"))
        columns[name] = scores
    table = pd.DataFrame(columns)
    table.index.name = "parameter"
    return table.sort_values("mean", ascending=False)


def heatmap(table: pd.DataFrame, path: Path, title: str, fmt: str) -> Path:
    """A labelled heatmap PNG of a numeric table (rows × columns) with each cell's value written in."""
    from matplotlib.figure import Figure  # object API: no pyplot state, no backend switch

    fig = Figure(figsize=(max(6.0, 0.7 * len(table.columns) + 3), max(3.0, 0.35 * len(table.index) + 1.5)))
    ax = fig.subplots()
    image = ax.imshow(table.to_numpy(dtype=float), aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(table.columns)), labels=list(table.columns), rotation=45, ha="right")
    ax.set_yticks(range(len(table.index)), labels=list(table.index))
    for row in range(len(table.index)):
        for col in range(len(table.columns)):
            value = table.iat[row, col]
            if pd.notna(value):
                ax.text(col, row, format(value, fmt), ha="center", va="center", color="white", fontsize=7)
    ax.set_title(title)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def report_lines(study: optuna.Study) -> list[str]:
    """The per-class IoU table of the top trials and the `Hyperparameter importance` section, as printed."""
    ious = per_class_iou(study)
    lines = [f"per-class IoU (%) of the top {len(ious.columns)} completed trials:"]
    lines += [ious.round(1).to_string()] if len(ious.columns) else ["no completed trial"]
    lines.append("Hyperparameter importance (fANOVA; conditional parameters on the trials where they are active):")
    table = importance_per_class(study)
    lines.append(TOO_FEW if table is None else table.round(2).to_string())
    return lines


def write_artifacts(study: optuna.Study, folder: Path) -> list[Path]:
    """The heatmaps and the importance table as files in `folder` (those the study has enough trials for)."""
    written = []
    ious = per_class_iou(study)
    if len(ious.columns):
        written.append(heatmap(ious, folder / IOU_HEATMAP, "per-class IoU (%), best trials first", ".0f"))
    table = importance_per_class(study)
    if table is not None:
        table.to_csv(folder / IMPORTANCE_TABLE)
        written += [folder / IMPORTANCE_TABLE,
                    heatmap(table, folder / IMPORTANCE_HEATMAP, "fANOVA importance per class", ".2f")]
    return written


def sweep_report(sweep: str | None = None, tracking=None) -> list[str]:
    """`affseg report`: the per-class tables of sweep `sweep` (default: the latest), finished or running."""
    from affseg.config import TrackingConfig
    from affseg.sweep.promote import sweep_parent
    from affseg.sweep.pruning import absolute_storage, open_storage
    from affseg.sweep.tracking import SWEEP_TAG, open_experiment

    tracking = tracking or TrackingConfig()
    client, experiment_id = open_experiment(tracking)
    name = sweep_parent(client, experiment_id, sweep).data.tags[SWEEP_TAG]
    study = optuna.load_study(study_name=name, storage=open_storage(absolute_storage(tracking.optuna_storage)))
    states = pd.Series([t.state.name.lower() for t in study.get_trials(deepcopy=False)]).value_counts()
    counts = ", ".join(f"{n} {state}" for state, n in states.items())
    return [f"sweep {name}: {len(study.trials)} trials ({counts})", *report_lines(study)]
