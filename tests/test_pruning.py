"""The Optuna ↔ Ray Tune pruning bridge: PRUNED / FAIL / COMPLETE reach the Optuna study and MLflow.

`synthetic_train` follows `affseg.train.train`'s protocol exactly (callbacks, checkpoints in
`train.out_dir`, `last.pt` resume) with a deterministic validation curve computed from the config:
the sweep machinery runs for real (Ray Tune, Optuna on SQLite, MLflow on SQLite) in seconds.
`synthetic_train_fused` does the same for a fused group (`affseg.train.train_fused`'s protocol).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
from sweep_helpers import run_isolated_sweep
from PIL import Image

from affseg.callbacks import TrainResult, ValidationResult
from affseg.data.classes import VOC_CLASSES

SYNTHETIC_SPACE = """
parameters:
  refine.alpha: {type: int, low: 1, high: 4}
  optim.lr: {type: loguniform, low: 1.0e-5, high: 1.0e-3}
  refine.deviation: {type: categorical, choices: [abs, signed]}
metric: val/miou
mode: max
pruner: {type: median, n_startup_trials: 1, n_warmup_steps: 0}
sampler: {seed: 3}
"""
# Fast settings over the demo profile: no dataset (the working folder stands in), 4 validations per
# trial, sequential trials.
SYNTHETIC_OVERRIDES = ("data.demo=false", "data.root=.", "train.iterations=40", "train.val_interval=10", "trials=5",
                       "concurrency=1", "max_failures=0")
FAIL_ALPHA = 4  # synthetic_train raises at its first validation for refine.alpha=4 with deviation signed
SLEEP_ENV = "AFFSEG_TEST_SLEEP_S"  # seconds per synthetic validation (resume / cluster tests need time to act)
EVENTS_ENV = "AFFSEG_TEST_EVENTS"  # file: synthetic_train appends one JSON line per (re)start and validation


def synthetic_quality(alpha: int, lr: float) -> float:
    """Final mIoU of the synthetic run: best at alpha 2 and lr 1e-4."""
    return 0.6 - 0.1 * abs(alpha - 2) - 0.08 * abs(math.log10(lr) + 4)


def _validation(config, iteration: int, out_dir: Path) -> ValidationResult:
    miou = synthetic_quality(config.refine.alpha, config.optim.lr) * iteration / config.train.iterations
    ious = np.array([miou * (1 + 0.01 * k) for k in range(len(VOC_CLASSES))])
    ious[-1] = np.nan  # a class absent from truth and prediction: no iou/<class> metric
    figure = out_dir / "figures" / f"curve_{iteration:06d}.png"
    figure.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), int(255 * miou), np.uint8)).save(figure)
    return ValidationResult(iteration=iteration, miou=miou, pixel_acc=miou + 0.2, mean_acc=miou + 0.1,
                            per_class=pd.DataFrame({"class": VOC_CLASSES, "iou": ious}),
                            confusion=np.eye(len(VOC_CLASSES), dtype=np.int64), pseudo={"refined": miou / 2},
                            figures={"curve.png": figure})


def _save(path: Path, iteration: int, best: dict | None) -> None:
    path.write_text(json.dumps({"iteration": iteration, "best": best}))


def _event(**values) -> None:
    import os

    import ray

    if os.environ.get(EVENTS_ENV):
        values["node"] = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
        with open(os.environ[EVENTS_ENV], "a") as file:
            file.write(json.dumps(values) + "\n")


class _SyntheticRun:
    """One configuration of a synthetic run, validation by validation: what `synthetic_train` (alone) and
    `synthetic_train_fused` (a group) do for each configuration."""

    def __init__(self, config, callbacks=(), resume_from=None):
        self.config, self.callbacks = config, list(callbacks)
        self.out = Path(config.train.out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        state = json.loads(Path(resume_from).read_text()) if resume_from else {"iteration": 0, "best": None}
        self.iteration = state["iteration"]
        self.best = ValidationResult.from_dict(state["best"]) if state["best"] else None
        self.history: list[ValidationResult] = []
        self.stopped = False
        self._pending: tuple[ValidationResult, bool] | None = None

    @property
    def training(self) -> bool:
        return self.iteration < self.config.train.iterations and not self.stopped

    def start(self) -> None:
        _event(out=str(self.out), kind="start", iteration=self.iteration)
        for callback in self.callbacks:
            callback.on_start(self.config, self.iteration)

    def evaluate(self) -> None:
        """Train up to the next validation and validate: losses logged, `last.pt` (and `best.pt`) written."""
        config = self.config
        self.iteration += config.train.val_interval
        for callback in self.callbacks:
            callback.on_log(self.iteration, {"loss": 1.0 / self.iteration, "loss/seg": 0.5, "loss/aff": 0.25,
                                             "lr": config.optim.lr})
        if config.refine.alpha == FAIL_ALPHA and config.refine.deviation == "signed":
            raise RuntimeError("synthetic failure for alpha 4 + signed deviation")
        result = _validation(config, self.iteration, self.out)
        is_best = self.best is None or result.miou > self.best.miou
        self.best = result if is_best else self.best
        self.history.append(result)
        _save(self.out / "last.pt", self.iteration, self.best.to_dict())
        if is_best:
            _save(self.out / "best.pt", self.iteration, self.best.to_dict())
        self._pending = (result, is_best)

    def report(self) -> None:
        """The callbacks see the validation; the run stops when one asks (before the last iteration)."""
        result, is_best = self._pending
        for callback in self.callbacks:
            callback.on_validation(result, self.out / "last.pt", is_best)
        total = self.config.train.iterations
        self.stopped = any(c.should_stop() for c in self.callbacks) and self.iteration < total
        _event(out=str(self.out), kind="validation", iteration=self.iteration, stopped=self.stopped)

    def end(self) -> TrainResult:
        outcome = TrainResult(best=self.best, best_checkpoint=self.out / "best.pt", last_checkpoint=self.out / "last.pt",
                              iterations_done=self.iteration, stopped_early=self.stopped, history=self.history)
        for callback in self.callbacks:
            callback.on_end(outcome)
        return outcome


def _sleep() -> None:
    import os
    import time

    time.sleep(float(os.environ.get(SLEEP_ENV, "0")))


def synthetic_train(config, callbacks=(), resume_from=None) -> TrainResult:
    """`affseg.train.train` stand-in: validations every `val_interval`, checkpoints, stop on request."""
    run = _SyntheticRun(config, callbacks, resume_from)
    run.start()
    while run.training:
        run.evaluate()
        _sleep()
        run.report()
    return run.end()


def synthetic_train_fused(members) -> list[TrainResult]:
    """`affseg.train.train_fused` stand-in: each `Member` (config, callbacks, resume_from) runs as in
    `synthetic_train`, all validating together (one sleep per validation: the shared teacher pass); a member
    whose callback says stop leaves, the others go on; every member's `on_end` when the group ends."""
    runs = [_SyntheticRun(member.config, member.callbacks, member.resume_from) for member in members]
    starts = sorted({run.iteration for run in runs})
    if len(starts) > 1:  # as the real trainer: one group, one schedule
        raise RuntimeError(f"resume: the members of a fused group resume from one iteration, got {starts}")
    for run in runs:
        run.start()
    while active := [run for run in runs if run.training]:
        for run in active:
            run.evaluate()
        _sleep()
        for run in active:
            run.report()
    return [run.end() for run in runs]


# ---------------------------------------------------------------- the bridge driven by hand (no Ray)

SEED3_STATES = ["COMPLETE", "FAIL", "COMPLETE", "PRUNED", "COMPLETE"]  # seeded TPE + median pruner, see above


def _spec(tmp_path):
    from affseg.sweep.space import load_space

    path = tmp_path / "synthetic.yaml"
    path.write_text(SYNTHETIC_SPACE)
    return load_space(path, "demo", SYNTHETIC_OVERRIDES)


def _drive(bridge, link_for, ray_id: str) -> None:
    """What Ray + run_trial do for one trial, minus Ray: sample, train synthetically, report, complete."""
    from affseg.sweep.pruning import OBJECTIVE_KEY, PRUNED_KEY

    config = bridge.suggest(ray_id)
    params, link = config["params"], link_for(config["optuna_trial"])
    if params["refine.alpha"] == FAIL_ALPHA and params["refine.deviation"] == "signed":
        bridge.on_trial_complete(ray_id, None, error=True)
        return
    best, result = None, {}
    for iteration in (10, 20, 30, 40):
        value = synthetic_quality(params["refine.alpha"], params["optim.lr"]) * iteration / 40
        best = value if best is None else max(best, value)
        pruned = link.should_prune(iteration, value) and iteration < 40
        result = {PRUNED_KEY: float(pruned), OBJECTIVE_KEY: best}
        if pruned:
            break
    bridge.on_trial_complete(ray_id, result)


def test_bridge_tells_complete_pruned_and_fail(tmp_path):
    from affseg.sweep.pruning import OptunaBridge, StudyRef, TrialLink

    spec = _spec(tmp_path)
    ref = StudyRef(f"sqlite:///{tmp_path / 'optuna.db'}", "bridge", spec.pruner)
    bridge = OptunaBridge(spec, ref)
    for k in range(5):
        _drive(bridge, lambda number: TrialLink(ref, number), f"ray{k}")
    study = optuna.load_study(study_name="bridge", storage=ref.storage)
    assert [t.state.name for t in study.trials] == SEED3_STATES
    for trial in study.trials:
        quality = synthetic_quality(trial.params["refine.alpha"], trial.params["optim.lr"])
        if trial.state.name == "COMPLETE":
            assert trial.value == pytest.approx(quality)  # the told objective: best (= final) value
            assert sorted(trial.intermediate_values) == [10, 20, 30, 40]
        if trial.state.name == "PRUNED":
            assert trial.intermediate_values == {10: pytest.approx(quality / 4)}
            assert trial.value == pytest.approx(quality / 4)
    assert TrialLink(ref, 0).finished()


def test_bridge_state_survives_pickle_and_restore(tmp_path):
    import pickle

    from affseg.sweep.pruning import OptunaBridge, StudyRef

    spec = _spec(tmp_path)
    ref = StudyRef(f"sqlite:///{tmp_path / 'optuna.db'}", "restore", spec.pruner)
    bridge = OptunaBridge(spec, ref)
    first = bridge.suggest("ray0")
    saved = tmp_path / "searcher.pkl"
    bridge.save(str(saved))
    orphan = bridge.suggest("ray1")  # asked after Ray's last snapshot, then the driver died
    revived = pickle.loads(pickle.dumps(bridge))  # what Ray does with tuner.pkl: no open study inside
    assert revived._study is None
    revived.restore(str(saved))
    assert revived.numbers == {"ray0": first["optuna_trial"]}
    revived.on_trial_complete("ray0", {"pruned": 0.0, "objective": 0.5})
    study = optuna.load_study(study_name="restore", storage=ref.storage)
    states = {t.number: t.state.name for t in study.trials}
    assert states == {first["optuna_trial"]: "COMPLETE", orphan["optuna_trial"]: "FAIL"}
    revived.on_trial_complete("ray0", None, error=True)  # told twice (stale Ray snapshot): first outcome kept
    assert optuna.load_study(study_name="restore", storage=ref.storage).trials[0].state.name == "COMPLETE"


def test_journal_storage_url(tmp_path):
    from affseg.sweep.pruning import absolute_storage, open_storage

    url = absolute_storage(f"journal:{tmp_path / 'shared' / 'optuna.log'}")
    study = optuna.create_study(storage=open_storage(url), study_name="j")
    study.tell(study.ask(), 1.0)
    assert (tmp_path / "shared" / "optuna.log").is_file()
    assert optuna.load_study(study_name="j", storage=open_storage(url)).best_value == 1.0


def test_untested_ray_version_is_refused_with_one_line():
    import subprocess

    code = "import ray; ray.__version__ = '2.61.0'; import affseg.sweep.pruning"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last == ("ImportError: affseg.sweep needs ray 2.60.x (found 2.61.0); reinstall with `make setup` "
                    "or update affseg/sweep/pruning.py after re-testing")


# ---------------------------------------------------------------- a real sweep (Ray Tune, Optuna, MLflow)


@pytest.fixture(scope="module")
def synthetic_sweep(tmp_path_factory):
    """Five sequential trials of `synthetic_train` through `run_sweep`, in a scratch working directory."""
    work = tmp_path_factory.mktemp("sweep")
    (work / "synthetic.yaml").write_text(SYNTHETIC_SPACE)
    summary = run_isolated_sweep(work, str(work / "synthetic.yaml"), "demo", overrides=SYNTHETIC_OVERRIDES,
                                 train_fn=synthetic_train)
    return summary, work


def test_sweep_states_in_optuna_and_ray(synthetic_sweep):
    from ray.tune import ExperimentAnalysis

    summary, work = synthetic_sweep
    assert summary.name == "synthetic-demo"
    study = optuna.load_study(study_name=summary.name, storage=f"sqlite:///{work / 'mlflow' / 'optuna.db'}")
    assert [t.state.name for t in study.trials] == SEED3_STATES
    assert summary.counts() == {"completed": 3, "pruned": 1, "failed": 1, "running": 0}
    ray_states = {t.config["optuna_trial"]: t.status for t in ExperimentAnalysis(str(summary.path)).trials}
    assert ray_states == {0: "TERMINATED", 1: "ERROR", 2: "TERMINATED", 3: "TERMINATED", 4: "TERMINATED"}
    completed = [t for t in study.trials if t.state.name == "COMPLETE"]
    best = max(completed, key=lambda t: t.value)
    assert summary.best.number == best.number and summary.best.value == pytest.approx(best.value)
    assert summary.best_per_class is not None and len(summary.best_per_class) == len(VOC_CLASSES) - 1
    assert summary.best_per_class["iou"].iloc[0] == pytest.approx(best.value)


def test_sweep_runs_in_mlflow(synthetic_sweep):
    from mlflow.tracking import MlflowClient

    from affseg.sweep.tracking import read_table

    summary, work = synthetic_sweep
    client = MlflowClient(f"sqlite:///{work / 'mlflow' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("affseg")
    runs = client.search_runs([experiment.experiment_id], "tags.`affseg.sweep` = 'synthetic-demo'")
    parents = [r for r in runs if r.data.tags["affseg.role"] == "parent"]
    children = {int(r.data.tags["affseg.trial"]): r for r in runs if r.data.tags["affseg.role"] == "trial"}
    assert len(parents) == 1 and sorted(children) == [0, 1, 2, 3, 4]
    parent = parents[0]
    assert {r.data.tags["mlflow.parentRunId"] for r in children.values()} == {parent.info.run_id}
    expected = {"COMPLETE": "completed", "PRUNED": "pruned", "FAIL": "failed"}
    assert [children[n].data.tags["state"] for n in range(5)] == [expected[s] for s in SEED3_STATES]
    assert [children[n].info.status for n in range(5)] == ["FINISHED", "FAILED", "FINISHED", "FINISHED", "FINISHED"]
    assert "synthetic failure" in children[1].data.tags["error"]

    done = children[summary.best.number]
    assert done.data.params["refine.alpha"] == str(summary.best.params["refine.alpha"])
    assert done.data.metrics["val/miou"] == pytest.approx(summary.best.value)
    assert done.data.metrics["best/val/miou"] == pytest.approx(summary.best.value)
    assert done.data.metrics["iou/background"] == pytest.approx(summary.best.value)
    assert "iou/tvmonitor" not in done.data.metrics  # NaN IoU: no metric
    history = client.get_metric_history(done.info.run_id, "val/miou")
    assert [m.step for m in history] == [10, 20, 30, 40]
    assert [m.step for m in client.get_metric_history(children[3].info.run_id, "val/miou")] == [10]  # pruned
    assert [m.step for m in client.get_metric_history(done.info.run_id, "lr")] == [10, 20, 30, 40]
    artifacts = {a.path for a in client.list_artifacts(done.info.run_id)} | {
        a.path for folder in ("checkpoint", "tables", "figures") for a in client.list_artifacts(done.info.run_id, folder)}
    assert {"checkpoint/best.pt", "tables/per_class_iou.json", "figures/curve_000040.png"} <= artifacts
    table = read_table(client, done.info.run_id, "tables/per_class_iou.json")
    assert len(table) == 4 * len(VOC_CLASSES) and sorted(set(table["iteration"])) == [10, 20, 30, 40]

    assert parent.data.tags["state"] == "completed"
    assert parent.data.tags["best_trial"] == str(summary.best.number)
    assert parent.data.metrics["best/val/miou"] == pytest.approx(summary.best.value)
    assert parent.data.params["space"] == "synthetic" and parent.data.params["profile"] == "demo"
    assert len(parent.data.tags["mlflow.source.git.commit"]) in (40, len("unknown"))
    parent_files = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert "val_curves.png" in parent_files
    trials = read_table(client, parent.info.run_id, "tables/trials.json")
    assert sorted(trials["trial"]) == [0, 1, 2, 3, 4]
    assert dict(zip(trials["trial"], trials["state"]))[3] == "pruned"


# Ray workers unpickle this module's functions by value: tests/ is not on their sys.path.
import ray.cloudpickle  # noqa: E402

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def test_no_pruning_before_startup_trials_complete():
    """With n_startup_trials=2, a trial far below the others is kept while fewer than 2 trials have completed,
    and pruned at the same point once 2 have; without the wrapper it would be pruned at once."""
    from affseg.sweep.pruning import build_pruner
    from affseg.sweep.space import PrunerSpec

    def verdicts(startup: int | None) -> list[bool]:
        spec = PrunerSpec(type="successive_halving", min_resource=1, reduction_factor=2, n_startup_trials=startup)
        study = optuna.create_study(direction="maximize", pruner=build_pruner(spec, max_resource=4))
        pruned = []
        for value in (0.9, 0.1, 0.8, 0.1):  # the two 0.1 trials: one before, one after two completions
            trial = study.ask()
            trial.report(value, step=1)
            pruned.append(trial.should_prune())
            study.tell(trial, state=optuna.trial.TrialState.PRUNED) if pruned[-1] else study.tell(trial, value)
        return pruned

    assert verdicts(None)[1] is True  # the weak trial, no startup: pruned
    assert verdicts(2)[1] is False  # the same trial before 2 completions: kept
    assert verdicts(2)[3] is True  # after them: pruned, against the startup trials' recorded rungs
