"""A sweep on a multi-node Ray cluster with (declared) GPUs: one trial per GPU, and a trial whose node dies
restarts on another node from its last checkpoint. `ray.cluster_utils.Cluster` runs the nodes locally."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from sweep_helpers import read_events, sweep_losing_a_node

SPACE = """
parameters:
  refine.alpha: {type: int, low: 1, high: 3}
  optim.lr: {type: loguniform, low: 1.0e-5, high: 1.0e-3}
metric: val/miou
mode: max
pruner: {type: median, n_startup_trials: 10}
sampler: {seed: 0}
"""
OVERRIDES = ("data.demo=false", "data.root=.", "train.iterations=40", "train.val_interval=10", "trials=2", "max_failures=2")
NODE_LOSS_TIMEOUT_S = 300


@pytest.mark.slow
def test_sweep_on_gpu_cluster_survives_a_lost_node(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient
    from ray.tune import ExperimentAnalysis

    from test_pruning import EVENTS_ENV, SLEEP_ENV, synthetic_train

    from affseg.sweep.tuner import run_sweep

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    events = tmp_path / "events.jsonl"
    monkeypatch.setenv(EVENTS_ENV, str(events))
    monkeypatch.setenv(SLEEP_ENV, "1.5")
    (tmp_path / "space.yaml").write_text(SPACE)

    def first_validation_on_a_worker(seen: list[dict], workers: dict) -> dict | None:
        """After a trial's first checkpoint: its node."""
        return next((e for e in seen if e["kind"] == "validation" and e["node"] in workers), None)

    summary, lost = sweep_losing_a_node(
        lambda: run_sweep(str(tmp_path / "space.yaml"), "demo", overrides=OVERRIDES, train_fn=synthetic_train),
        events, first_validation_on_a_worker, NODE_LOSS_TIMEOUT_S)

    assert lost, "no trial reached a checkpoint on a worker node"
    study = optuna.load_study(study_name=summary.name, storage=f"sqlite:///{tmp_path}/mlflow/optuna.db")
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    ray_trials = ExperimentAnalysis(str(summary.path)).trials
    assert {t.status for t in ray_trials} == {"TERMINATED"}
    assert max(t.num_failures for t in ray_trials) == 1

    trial_of = lambda event: Path(event["out"]).parent.name  # noqa: E731 - trial folder; its parent is node-local
    starts = [e for e in read_events(events) if e["kind"] == "start" and trial_of(e) == trial_of(lost)]
    assert len(starts) == 2, read_events(events)
    assert [e["iteration"] for e in starts][0] == 0
    restart = starts[-1]
    assert restart["iteration"] >= lost["iteration"] > 0  # resumed from its checkpoint, not from scratch
    assert restart["node"] != lost["node"]
    first_starts = [e for e in read_events(events) if e["kind"] == "start" and e["iteration"] == 0]
    assert len({e["node"] for e in first_starts}) == 2  # the two trials ran side by side, one GPU node each

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow/mlflow.db")
    experiment_id = client.get_experiment_by_name("affseg").experiment_id
    children = client.search_runs([experiment_id], "tags.`affseg.role` = 'trial'")
    assert sorted(int(r.data.tags["affseg.trial"]) for r in children) == [0, 1]  # no duplicate after restart
    assert {r.data.tags["state"] for r in children} == {"completed"}
    resumed = [r for r in children if len(client.get_metric_history(r.info.run_id, "start_iteration")) == 2]
    assert len(resumed) == 1
    steps = {m.step for m in client.get_metric_history(resumed[0].info.run_id, "val/miou")}
    assert steps == {10, 20, 30, 40}
