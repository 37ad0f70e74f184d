"""Per-class view of a sweep: top-trial IoU table and heatmap, fANOVA importance per class (SPEC §5.5)."""

from __future__ import annotations

import numpy as np
import optuna
import pytest

from affseg.sweep import analysis

TRIALS = 12


def _study(count: int = TRIALS) -> optuna.Study:
    """alpha drives person's IoU, threshold drives chair's; bg_power exists only with background=power."""
    rng = np.random.default_rng(0)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(count):
        trial = study.ask()
        alpha = trial.suggest_int("refine.alpha", 1, 4)
        threshold = trial.suggest_float("refine.box_threshold", 0.2, 0.7)
        if trial.suggest_categorical("refine.background", ["power", "constant"]) == "power":
            trial.suggest_float("refine.bg_power", 0.5, 3.0)
        person, chair = 0.2 * alpha + 0.01 * rng.random(), threshold + 0.01 * rng.random()
        for name, iou in (("background", 0.8), ("person", person), ("chair", chair)):
            trial.set_user_attr(f"iou/{name}", iou)
        study.tell(trial, (0.8 + person + chair) / 3)
    return study


def test_importance_names_the_knob_that_moves_each_class():
    table = analysis.importance_per_class(_study())
    assert list(table.columns) == ["mean", "background", "person", "chair"]
    assert {"refine.alpha", "refine.box_threshold", "refine.background", "refine.bg_power"} == set(table.index)
    assert table["person"].idxmax() == "refine.alpha" and table["chair"].idxmax() == "refine.box_threshold"
    assert table.loc["refine.bg_power", ["mean", "person", "chair"]].notna().all()  # conditional: on its trials
    assert table["background"].isna().all()  # a constant IoU has no importances


def test_few_completed_trials_give_no_importance_table():
    study = _study(analysis.MIN_TRIALS - 1)
    assert analysis.importance_per_class(study) is None
    lines = analysis.report_lines(study)
    assert analysis.TOO_FEW in lines and any(line.startswith("Hyperparameter importance") for line in lines)


def test_top_trials_table_is_best_first_and_artifacts_are_written(tmp_path):
    study = _study()
    ious = analysis.per_class_iou(study, top=3)
    best = sorted(study.trials, key=lambda t: t.value, reverse=True)[:3]
    assert list(ious.columns) == [f"trial {t.number}" for t in best]
    assert ious.loc["person", f"trial {best[0].number}"] == pytest.approx(100 * best[0].user_attrs["iou/person"])
    written = {path.name for path in analysis.write_artifacts(study, tmp_path)}
    assert written == {analysis.IOU_HEATMAP, analysis.IMPORTANCE_TABLE, analysis.IMPORTANCE_HEATMAP}
    assert all((tmp_path / name).stat().st_size > 0 for name in written)
