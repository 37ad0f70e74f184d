"""MLflow tracking: child runs keyed by tags (never duplicated on resume), what each hook logs, the
parent's summary, and state sync. Local SQLite store in a temporary folder; no Ray."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from affseg.callbacks import TrainResult, ValidationResult
from affseg.config import Config, TrackingConfig, from_dict, to_dict
from affseg.data.classes import VOC_CLASSES
from affseg.sweep.tracking import (
    MlflowCallback, TrackingRef, TrialRecord, absolute_uri, child_run, child_runs, finish_parent, flatten,
    open_experiment, parent_run, read_table, sync_states, tracking_uri,
)


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A fresh tracking store and a parent run; returns (client, ref)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = TrackingConfig(mlflow_uri=f"sqlite:///{tmp_path}/mlflow.db", artifact_root=str(tmp_path / "artifacts"))
    client, experiment_id = open_experiment(cfg)
    space = tmp_path / "space.yaml"
    space.write_text("parameters: {}\n")
    parent = parent_run(client, experiment_id, "s1", [space], {"space": "space", "trials": 3})
    return client, TrackingRef(tracking_uri(cfg), experiment_id, "s1", parent)


def _result(iteration: int, miou: float, tmp_path) -> ValidationResult:
    ious = np.full(len(VOC_CLASSES), miou)
    ious[3] = np.nan
    figure = tmp_path / f"confusion_{iteration:06d}.png"
    figure.write_bytes(b"\x89PNG\r\n\x1a\n")
    return ValidationResult(iteration, miou, 0.8, 0.7, pd.DataFrame({"class": VOC_CLASSES, "iou": ious}),
                            np.eye(len(VOC_CLASSES), dtype=np.int64), {"cam": 0.3, "refined": 0.4},
                            {"confusion.png": figure})


def _config(tmp_path) -> Config:
    return from_dict({"refine": {"alpha": 3}, "train": {"out_dir": str(tmp_path / "out")}})


def test_absolute_uri_and_env_override(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert absolute_uri("sqlite:///mlflow/mlflow.db") == f"sqlite:///{tmp_path}/mlflow/mlflow.db"
    assert (tmp_path / "mlflow").is_dir()
    assert absolute_uri("postgresql://db/mlflow") == "postgresql://db/mlflow"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking:5000")
    assert tracking_uri(TrackingConfig()) == "http://tracking:5000"


def test_trial_run_logs_everything(store, tmp_path):
    client, ref = store
    config = _config(tmp_path)
    callback = MlflowCallback(ref, 7, config)
    callback.on_start(config, 0)
    callback.on_log(10, {"loss": 2.0, "loss/seg": 1.5, "loss/aff": 5.0, "lr": 1e-4})
    callback.on_validation(_result(10, 0.30, tmp_path), tmp_path / "last.pt", True)
    callback.on_validation(_result(20, 0.25, tmp_path), tmp_path / "last.pt", False)
    best = tmp_path / "best.pt"
    best.write_bytes(b"weights")
    callback.on_end(TrainResult(_result(10, 0.30, tmp_path), best, tmp_path / "last.pt", 20, False))

    run = client.get_run(callback.run_id)
    assert run.data.tags["mlflow.parentRunId"] == ref.parent_run_id
    assert (run.data.tags["affseg.trial"], run.data.tags["state"], run.info.status) == ("7", "completed", "FINISHED")
    assert run.data.params["refine.alpha"] == "3"
    assert len(run.data.params) == len(flatten(to_dict(config)))
    assert run.data.params["refine.par.dilations"] == "[1, 2, 4, 8, 12, 24]"
    assert run.data.metrics["val/miou"] == pytest.approx(0.25)  # latest
    assert run.data.metrics["best/val/miou"] == pytest.approx(0.30)
    assert run.data.metrics["pseudo/refined"] == pytest.approx(0.4)
    assert f"iou/{VOC_CLASSES[3]}" not in run.data.metrics and "iou/person" in run.data.metrics
    assert [(m.step, m.value) for m in client.get_metric_history(callback.run_id, "loss/aff")] == [(10, 5.0)]
    assert [m.step for m in client.get_metric_history(callback.run_id, "val/miou")] == [10, 20]
    table = read_table(client, callback.run_id, "tables/per_class_iou.json")
    assert list(table.columns) == ["iteration", "class", "iou"]
    assert len(table) == 2 * len(VOC_CLASSES)
    assert table[table.iteration == 20].set_index("class")["iou"]["person"] == pytest.approx(0.25)
    names = {a.path for folder in ("figures", "checkpoint") for a in client.list_artifacts(callback.run_id, folder)}
    assert names == {"figures/confusion_000010.png", "figures/confusion_000020.png", "checkpoint/best.pt"}


def test_resumed_trial_reuses_its_run(store, tmp_path):
    client, ref = store
    config = _config(tmp_path)
    first = MlflowCallback(ref, 2, config)
    first.on_start(config, 0)
    first.on_validation(_result(10, 0.2, tmp_path), tmp_path / "last.pt", True)
    again = MlflowCallback(ref, 2, config)  # a new process after a worker death or driver restart
    again.on_start(config, 10)
    again.on_validation(_result(20, 0.3, tmp_path), tmp_path / "last.pt", True)
    again.on_end(TrainResult(None, None, None, 20, True))
    assert again.run_id == first.run_id
    assert sorted(child_runs(client, ref.experiment_id, "s1")) == [2]
    assert [m.step for m in client.get_metric_history(first.run_id, "val/miou")] == [10, 20]
    assert client.get_run(first.run_id).data.tags["state"] == "pruned"  # stopped early = pruned


def test_failed_trial_is_tagged_even_before_training_started(store, tmp_path):
    client, ref = store
    callback = MlflowCallback(ref, 5, None)  # the trial's config could not even be built
    callback.mark_failed(ValueError("refine.alpha: 0 must be an integer >= 1"))
    run = client.get_run(callback.run_id)
    assert (run.data.tags["state"], run.info.status) == ("failed", "FAILED")
    assert run.data.tags["error"] == "ValueError: refine.alpha: 0 must be an integer >= 1"


def test_parent_is_found_again_and_summarised(store, tmp_path):
    client, ref = store
    assert parent_run(client, ref.experiment_id, "s1", [], {}) == ref.parent_run_id
    assert {a.path for a in client.list_artifacts(ref.parent_run_id, "space")} == {"space/space.yaml"}
    runs = {n: child_run(ref, n) for n in range(3)}
    for n, miou in enumerate([0.2, 0.5, 0.1]):
        client.log_metric(runs[n], "val/miou", miou, step=10)
    client.set_tag(runs[1], "state", "running")  # its worker died; Optuna says completed
    records = [TrialRecord(0, "pruned", 0.2, {"refine.alpha": 1}, runs[0]),
               TrialRecord(1, "completed", 0.5, {"refine.alpha": 2}, runs[1]),
               TrialRecord(2, "failed", None, {"refine.alpha": 4}, runs[2])]
    sync_states(client, records)
    assert [client.get_run(runs[n]).data.tags["state"] for n in range(3)] == ["pruned", "completed", "failed"]
    finish_parent(client, ref, records, "val/miou", records[1])
    parent = client.get_run(ref.parent_run_id)
    assert parent.data.tags["best.refine.alpha"] == "2" and parent.data.tags["best_trial"] == "1"
    assert parent.data.metrics["best/val/miou"] == pytest.approx(0.5)
    assert (parent.data.tags["state"], parent.data.params["trials"]) == ("completed", "3")
    trials = read_table(client, ref.parent_run_id, "tables/trials.json")
    assert list(trials["state"]) == ["pruned", "completed", "failed"]
    finish_parent(client, ref, records, "val/miou", records[1])  # resuming a finished sweep finishes it again
    assert len(read_table(client, ref.parent_run_id, "tables/trials.json")) == 3  # replaced, not appended
    assert "val_curves.png" in {a.path for a in client.list_artifacts(ref.parent_run_id)}
