"""`RESUME=1` after a killed driver, and a lost worker node, restore every member of a fused group (SPEC §5.4):
each member keeps its Optuna trial, its outcome and its MLflow child run; a member that had left (pruned) is
not trained again, the others go on from the group's last checkpoint.

Both sweeps run `synthetic_train_fused` (tests/test_pruning.py) in groups of two. The pruner is successive
halving with its rungs at iterations 10, 40, 160: with sampler seed 5, the second member of each group drawn
from that seed (trials 0-1 and 2-3; a resumed sweep reseeds its sampler) is worse than the first, so it is
pruned at its first validation; the first member goes on unless a better one reached the rung before it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from sweep_helpers import read_events, sweep_losing_a_node

TESTS = Path(__file__).resolve().parent
FUSED_SPACE = """
parameters:
  refine.alpha: {type: int, low: 1, high: 3}
  optim.lr: {type: loguniform, low: 1.0e-5, high: 1.0e-3}
metric: val/miou
mode: max
# n_startup_trials: 0, or the demo profile's 4 would keep every trial here from being pruned
pruner: {type: successive_halving, min_resource: 10, reduction_factor: 4, n_startup_trials: 0}
sampler: {seed: 5}
"""
SWEEP = "fused-demo"  # <space file stem>-<profile>
COMMON = ("data.demo=false", "data.root=.", "train.val_interval=10", "fuse=2")
# Killed driver: two groups one after the other, six validations each.
DRIVER_OVERRIDES = (*COMMON, "train.iterations=60", "trials=4", "concurrency=1", "max_failures=0")
# Lost worker: two groups side by side, one per GPU node, four validations each.
CLUSTER_OVERRIDES = (*COMMON, "train.iterations=40", "trials=4", "max_failures=2")
STATES = {"COMPLETE": "completed", "PRUNED": "pruned", "FAIL": "failed"}
TIMEOUT_S = 240

DRIVER = """
import sys
sys.path.insert(0, {tests!r})
import ray
from test_pruning import synthetic_train_fused
from affseg.sweep.tuner import run_sweep
ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
run_sweep({space!r}, "demo", overrides={overrides!r}, fused_train_fn=synthetic_train_fused)
"""


def _member(event: dict) -> int:
    return int(Path(event["out"]).name)  # <trial scratch>/train/<optuna number>


def _group_dir(event: dict) -> str:
    return Path(event["out"]).parent.parent.name  # the Ray trial's (node-local) working folder


def _finished(storage: str) -> dict[int, str]:
    try:
        study = optuna.load_study(study_name=SWEEP, storage=storage)
    except Exception:  # the driver has not created the study yet
        return {}
    return {t.number: t.state.name for t in study.trials if t.state.is_finished()}


def _saved_results(experiment: Path) -> int:
    """The most results any trial has in the experiment state Ray last saved (what a resume restores)."""
    most = 0
    for path in experiment.glob("experiment_state-*.json"):
        try:
            trials = json.loads(path.read_text())["trial_data"]
        except (OSError, ValueError, KeyError):  # being written
            continue
        for _, run_metadata in trials:
            result = json.loads(run_metadata).get("last_result") or {}
            most = max(most, int(result.get("training_iteration", 0)))
    return most


def _outcome(work: Path, summary) -> tuple[dict[int, str], dict[str, list[int]], dict[int, object], object]:
    """Optuna state per trial, Ray trial id → its members, MLflow child run per member, and the MlflowClient;
    checks what every fused sweep must hold: no member lost or added, every member COMPLETE or PRUNED, one
    child run per member with Optuna's state and its best checkpoint, one parent run."""
    from mlflow.tracking import MlflowClient
    from ray.tune import ExperimentAnalysis

    study = optuna.load_study(study_name=SWEEP, storage=f"sqlite:///{work}/mlflow/optuna.db")
    states = {t.number: t.state.name for t in study.trials}
    groups = {t.trial_id: [m["optuna_trial"] for m in t.config["members"]]
              for t in ExperimentAnalysis(str(summary.path)).trials}
    members = sorted(n for group in groups.values() for n in group)
    assert members == sorted(states) == list(range(len(states))), (groups, states)  # none lost, none added
    assert all(states[n] in ("COMPLETE", "PRUNED") for n in members), states

    client = MlflowClient(f"sqlite:///{work}/mlflow/mlflow.db")
    experiment_id = client.get_experiment_by_name("affseg").experiment_id
    runs = client.search_runs([experiment_id], f"tags.`affseg.sweep` = '{SWEEP}'")
    assert sum(r.data.tags["affseg.role"] == "parent" for r in runs) == 1
    children = [r for r in runs if r.data.tags["affseg.role"] == "trial"]
    by_trial = {int(r.data.tags["affseg.trial"]): r for r in children}
    assert len(children) == len(by_trial) and sorted(by_trial) == members  # one child run per member
    for number, run in by_trial.items():
        assert run.data.tags["state"] == STATES[states[number]], number
        assert run.info.status == "FINISHED", number
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "checkpoint")}
        assert artifacts == {"checkpoint/best.pt"}, (number, states[number])  # as an unfused trial logs it
    return states, groups, by_trial, client


def _start_iterations(client, run) -> list[float]:
    return sorted(m.value for m in client.get_metric_history(run.info.run_id, "start_iteration"))


@pytest.mark.slow
def test_killed_driver_resumes_every_fused_member(tmp_path, monkeypatch):
    import ray

    from test_pruning import EVENTS_ENV, SLEEP_ENV, synthetic_train_fused

    from affseg.sweep.tuner import run_sweep

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    events = tmp_path / "events.jsonl"
    monkeypatch.setenv(EVENTS_ENV, str(events))
    monkeypatch.setenv(SLEEP_ENV, "1.5")
    space = tmp_path / "fused.yaml"
    space.write_text(FUSED_SPACE)
    log = open(tmp_path / "driver.log", "w")
    script = DRIVER.format(tests=str(TESTS), space=str(space), overrides=DRIVER_OVERRIDES)
    driver = subprocess.Popen([sys.executable, "-c", script], stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    storage = f"sqlite:///{tmp_path}/mlflow/optuna.db"
    deadline = time.monotonic() + TIMEOUT_S
    try:  # until Ray has saved the first group's second result, so also its first checkpoint
        while _saved_results(tmp_path / "runs" / "sweeps" / SWEEP) < 2:
            assert time.monotonic() < deadline and driver.poll() is None, (tmp_path / "driver.log").read_text()
            time.sleep(0.2)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)  # the driver and the local Ray it started: a hard crash
        driver.wait()
        log.close()
    before = _finished(storage)
    assert before == {1: "PRUNED"}, before  # member 1 left group 0 at its first validation, member 0 trains on
    killed_at = max(e["iteration"] for e in read_events(events) if _member(e) == 0)
    assert 20 <= killed_at < 60

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        summary = run_sweep(str(space), "demo", resume=True, fused_train_fn=synthetic_train_fused)
    finally:
        ray.shutdown()

    states, groups, by_trial, client = _outcome(tmp_path, summary)
    assert sorted(map(sorted, groups.values())) == [[0, 1], [2, 3]]
    assert {n: states[n] for n in before} == before  # finished before the kill: outcome kept
    assert states[0] == "COMPLETE"
    for number in before:  # never started again
        assert _start_iterations(client, by_trial[number]) == [0.0], number
        assert len([e for e in read_events(events) if e["kind"] == "start" and _member(e) == number]) == 1
    first, resumed = _start_iterations(client, by_trial[0])
    assert first == 0 and 10 <= resumed <= killed_at  # from the group's last saved checkpoint, not from scratch
    steps = [m.step for m in client.get_metric_history(by_trial[0].info.run_id, "val/miou")]
    assert steps == [10, 20, 30, 40, 50, 60]  # each validation logged once, also those run again
    for number in (2, 3):  # the group after the kill: started once
        assert _start_iterations(client, by_trial[number]) == [0.0], number
    assert not summary.interrupted


@pytest.mark.slow
def test_lost_worker_restarts_the_group_with_its_live_members(tmp_path, monkeypatch):
    from ray.tune import ExperimentAnalysis

    from test_pruning import EVENTS_ENV, SLEEP_ENV, synthetic_train_fused

    from affseg.sweep.tuner import run_sweep

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    events = tmp_path / "events.jsonl"
    monkeypatch.setenv(EVENTS_ENV, str(events))
    monkeypatch.setenv(SLEEP_ENV, "1.5")
    (tmp_path / "fused.yaml").write_text(FUSED_SPACE)

    def validated_after_a_member_left(seen: list[dict], workers: dict) -> dict | None:
        """A group on a worker node that has validated again after one of its members left."""
        for event in seen:
            if event["kind"] != "validation" or event["stopped"] or event["node"] not in workers:
                continue
            left = [e for e in seen if e.get("stopped") and _group_dir(e) == _group_dir(event)]
            if left and event["iteration"] > min(e["iteration"] for e in left):
                return {**event, "left": {_member(e) for e in left}}
        return None

    summary, lost = sweep_losing_a_node(
        lambda: run_sweep(str(tmp_path / "fused.yaml"), "demo", overrides=CLUSTER_OVERRIDES,
                          fused_train_fn=synthetic_train_fused),
        events, validated_after_a_member_left, TIMEOUT_S)
    assert lost, f"no group reached a validation after a member left: {read_events(events)}"

    states, groups, by_trial, client = _outcome(tmp_path, summary)
    assert sorted(map(sorted, groups.values())) == [[0, 1], [2, 3]]
    ray_trials = ExperimentAnalysis(str(summary.path)).trials
    assert {t.status for t in ray_trials} == {"TERMINATED"}
    assert sorted(t.num_failures for t in ray_trials) == [0, 1]
    all_events = read_events(events)
    killed = [m for m in (0, 1, 2, 3) if any(_member(e) == m and _group_dir(e) == _group_dir(lost)
                                            for e in all_events)]
    live = [m for m in killed if m not in lost["left"]]
    assert sorted(killed) in ([0, 1], [2, 3]) and lost["left"] and live
    for number in lost["left"]:  # left before the kill: stays PRUNED, not trained again
        assert states[number] == "PRUNED"
        assert len([e for e in all_events if e["kind"] == "start" and _member(e) == number]) == 1
        assert _start_iterations(client, by_trial[number]) == [0.0]
    for number in live:  # restarted on another node from the group's checkpoint, then finished
        starts = [e for e in all_events if e["kind"] == "start" and _member(e) == number]
        assert [e["iteration"] for e in starts][0] == 0 and len(starts) == 2, starts
        assert lost["iteration"] >= starts[1]["iteration"] >= 10
        assert starts[1]["node"] != lost["node"]
        assert _start_iterations(client, by_trial[number]) == [0.0, float(starts[1]["iteration"])]
        assert states[number] == "COMPLETE"
        steps = [m.step for m in client.get_metric_history(by_trial[number].info.run_id, "val/miou")]
        assert steps == [10, 20, 30, 40]
    others = [m for m in (0, 1, 2, 3) if m not in killed]  # the group on the node that lived: started once
    assert all(_start_iterations(client, by_trial[m]) == [0.0] for m in others)
    first_starts = [e for e in all_events if e["kind"] == "start" and e["iteration"] == 0]
    assert len({e["node"] for e in first_starts}) == 2  # the two groups ran side by side, one GPU node each

