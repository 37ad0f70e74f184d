"""End to end: a tiny real sweep (the real training loop, demo profile), promotion of its best trial to a
registered pyfunc model, and (slow) resuming a sweep whose driver was killed."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
from sweep_helpers import run_isolated_sweep

from affseg.config import TrackingConfig

TESTS = Path(__file__).resolve().parent
DEMO_ENCODER = TESTS.parent / "affseg" / "assets" / "unicl_swin_tiny_demo.pth"
# The demo profile with a schedule small enough for CI: 2 trials x 2 validations on the 24-image demo set.
REAL_OVERRIDES = ["train.iterations=8", "train.val_interval=4", "train.log_interval=2", "train.batch_size=2",
                  "data.val_limit=4", "data.pseudo_subset=4", "trials=2"]


@pytest.fixture(scope="module")
def real_sweep(small_demo, tmp_path_factory):
    """`run_sweep('refine', 'demo')` with the real `affseg.train.train`; the encoder weights are a copy
    (promotion references or bundles that file, and one test edits it)."""
    work = tmp_path_factory.mktemp("real")
    encoder = work / "encoder.pth"
    shutil.copy(DEMO_ENCODER, encoder)
    overrides = [f"data.root={small_demo}", f"model.checkpoint={encoder}", *REAL_OVERRIDES]
    summary = run_isolated_sweep(work, "refine", "demo", overrides=overrides)
    return summary, work, encoder


def _tracking(work: Path) -> TrackingConfig:
    return TrackingConfig(mlflow_uri=f"sqlite:///{work}/mlflow/mlflow.db", artifact_root=str(work / "mlflow/artifacts"))


def test_real_sweep_trains_and_tracks(real_sweep):
    from mlflow.tracking import MlflowClient

    summary, work, _ = real_sweep
    assert summary.name == "refine-demo"
    assert summary.counts()["completed"] == 2
    client = MlflowClient(f"sqlite:///{work}/mlflow/mlflow.db")
    run = client.get_run(summary.best.run_id)
    assert run.data.tags["state"] == "completed"
    assert 0.0 < run.data.metrics["val/miou"] <= 1.0 and "iou/background" in run.data.metrics
    assert {"pseudo/cam", "pseudo/cam_par", "pseudo/refined"} <= set(run.data.metrics)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/miou")] == [4, 8]
    assert client.get_metric_history(run.info.run_id, "loss/aff")  # per-iteration losses
    assert run.data.params["refine.alpha"] == str(summary.best.params["refine.alpha"])
    figures = {a.path for a in client.list_artifacts(run.info.run_id, "figures")}
    assert any(name.startswith("figures/confusion_") for name in figures)
    assert {a.path for a in client.list_artifacts(run.info.run_id, "checkpoint")} == {"checkpoint/best.pt"}
    assert summary.best_per_class is not None and "background" in set(summary.best_per_class["class"])
    text = "\n".join(summary.lines())
    assert "best trial" in text and "make mlflow-ui" in text and "per-class IoU" in text
    assert "savings: 16 of 16 trial-iterations trained" in text  # two trials of 8 iterations, none pruned
    parent = client.get_run(summary.parent_run_id)
    assert parent.data.metrics["savings/fraction_saved"] == 0.0 and parent.data.metrics["savings/device_seconds_saved"] >= 0


def test_promote_registers_champion_with_bundled_encoder(real_sweep, monkeypatch):
    import mlflow.pyfunc
    from mlflow.tracking import MlflowClient

    from affseg.sweep.promote import evaluate_registered, promote, resolve_model_uri, sha256

    summary, work, encoder = real_sweep
    monkeypatch.chdir(work)
    tracking = _tracking(work)
    assert promote(summary.name, tracking) == "models:/affseg/1"
    client = MlflowClient(tracking.mlflow_uri)
    version = client.get_model_version_by_alias("affseg", "champion")
    assert str(version.version) == "1" and version.run_id == summary.best.run_id
    assert version.tags["sweep"] == summary.name and version.tags["trial"] == str(summary.best.number)

    resolved = resolve_model_uri("models:/affseg@champion", tracking)
    assert resolved.checkpoint.is_file() and resolved.version == "1"
    assert Path(resolved.encoder_checkpoint).parent == resolved.checkpoint.parent  # bundled (12 MB < 50 MB)
    assert sha256(Path(resolved.encoder_checkpoint)) == sha256(encoder)

    model_dir = resolved.checkpoint.parent.parent
    model = mlflow.pyfunc.load_model(str(model_dir))
    image = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    masks = model.predict(np.stack([image, image[:, ::-1]]))
    assert masks.shape == (2, 48, 64) and masks.dtype == np.uint8 and masks.max() <= 20
    assert np.array_equal(model.predict(image[None])[0], masks[0])  # deterministic, a batch of one works too
    assert model.predict(image[None, :32]).shape == (1, 32, 64)

    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking.mlflow_uri)
    assert evaluate_registered("models:/affseg/1", split="val", limit=2) == 0


def test_promoted_model_is_code_with_signature_and_pinned_requirements(real_sweep, monkeypatch):
    """Saved from code (no pickled Python object), with a signature and the installed versions pinned."""
    import importlib.metadata

    import mlflow.pyfunc
    from mlflow.models import Model

    from affseg.sweep import promote as promotion

    summary, work, _ = real_sweep
    monkeypatch.chdir(work)
    tracking = _tracking(work)
    resolved = promotion.resolve_model_uri(promotion.promote(summary.name, tracking), tracking)
    model_dir = resolved.checkpoint.parent.parent
    flavor = Model.load(str(model_dir / "MLmodel")).flavors["python_function"]
    assert flavor["model_code_path"].endswith("pyfunc_model.py") and "python_model" not in flavor
    assert not list(model_dir.rglob("*.pkl")) and (model_dir / flavor["code"] / "affseg" / "evaluate.py").is_file()
    signature = Model.load(str(model_dir / "MLmodel")).signature
    assert signature.inputs.to_dict() == [{"type": "tensor", "tensor-spec": {"dtype": "uint8", "shape": (-1, -1, -1, 3)}}]
    requirements = (model_dir / "requirements.txt").read_text().split()
    for name in ("torch", "timm", "open-clip-torch", "numpy", "pillow", "mlflow"):
        assert f"{name}=={importlib.metadata.version(name)}" in requirements
    assert not any(line.startswith(("affseg", "ray", "optuna")) for line in requirements)
    model = mlflow.pyfunc.load_model(str(model_dir))
    with pytest.raises(mlflow.exceptions.MlflowException, match="dtype"):
        model.predict(np.zeros((1, 32, 32, 3), np.float32))  # the signature is enforced


def test_changed_decoder_checkpoint_is_refused(real_sweep, monkeypatch):
    import mlflow.pyfunc

    from affseg.sweep import promote as promotion

    summary, work, _ = real_sweep
    monkeypatch.chdir(work)
    tracking = _tracking(work)
    uri = promotion.promote(summary.name, tracking)
    resolved = promotion.resolve_model_uri(uri, tracking)
    record = json.loads((resolved.checkpoint.parent / "promoted.json").read_text())
    assert record["decoder"]["sha256"] == promotion.sha256(resolved.checkpoint)
    with open(resolved.checkpoint, "ab") as file:
        file.write(b"tampered")
    with pytest.raises(promotion.PromotionError, match=r"decoder checkpoint changed since promotion") as info:
        promotion.resolve_model_uri(uri, tracking)
    assert "\n" not in str(info.value) and str(resolved.checkpoint) in str(info.value)
    with pytest.raises(Exception, match=r"decoder checkpoint changed since promotion"):
        mlflow.pyfunc.load_model(str(resolved.checkpoint.parent.parent))


def test_large_encoder_is_referenced_and_checked(real_sweep, monkeypatch):
    from affseg.sweep import promote as promotion

    summary, work, encoder = real_sweep
    monkeypatch.chdir(work)
    monkeypatch.setattr(promotion, "BUNDLE_LIMIT_BYTES", 1024)  # pretend the encoder is a big one
    tracking = _tracking(work)
    uri = promotion.promote(summary.name, tracking)
    resolved = promotion.resolve_model_uri(uri, tracking)
    assert resolved.encoder_checkpoint == str(encoder)  # referenced by path, not copied
    record = json.loads((resolved.checkpoint.parent / "promoted.json").read_text())["encoder"]
    assert record["bundled"] is False and record["sha256"] == promotion.sha256(encoder)
    with open(encoder, "ab") as file:
        file.write(b"tampered")
    with pytest.raises(promotion.PromotionError, match=r"encoder weights changed since promotion") as info:
        promotion.resolve_model_uri(uri, tracking)
    assert "\n" not in str(info.value) and str(encoder) in str(info.value)
    with pytest.raises(promotion.PromotionError, match="not in the registry"):
        promotion.resolve_model_uri("models:/affseg@nobody", tracking)
    shutil.rmtree(work / "runs" / "models")  # fetch version 1 again: a later promotion left it as it was
    first = promotion.resolve_model_uri("models:/affseg/1", tracking)
    assert Path(first.encoder_checkpoint).parent == first.checkpoint.parent  # still the bundled copy


def test_bad_space_or_missing_data_stops_before_any_trial(tmp_path, monkeypatch):
    import ray

    from affseg.config import ConfigError
    from affseg.sweep.tuner import run_sweep

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    bad = tmp_path / "bad.yaml"
    bad.write_text("parameters:\n  refine.alpha: {type: int, low: 3, high: 1}\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: parameters\.refine\.alpha: low \(3\) must be below high"):
        run_sweep(str(bad), "demo")
    assert not ray.is_initialized() and not (tmp_path / "runs").exists() and not (tmp_path / "mlflow").exists()
    with pytest.raises(ConfigError, match=r"data\.root: .*missing is not a folder"):
        run_sweep("refine", "demo", overrides=["data.demo=false", "data.root=missing"])
    assert not ray.is_initialized() and not (tmp_path / "runs").exists()


# ---------------------------------------------------------------- resume after the driver dies

DRIVER = """
import sys
sys.path.insert(0, {tests!r})
import ray
from test_pruning import SYNTHETIC_OVERRIDES, synthetic_train
from affseg.sweep.tuner import run_sweep
ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
run_sweep({space!r}, "demo", overrides=SYNTHETIC_OVERRIDES, train_fn=synthetic_train)
"""
KILL_TIMEOUT_S = 240


def _finished(storage: str) -> dict[int, str]:
    try:
        study = optuna.load_study(study_name="synthetic-demo", storage=storage)
    except Exception:  # the driver has not created the study yet
        return {}
    return {t.number: t.state.name for t in study.trials if t.state.is_finished()}


@pytest.mark.slow
def test_killed_sweep_resumes_without_losing_or_rerunning_trials(tmp_path, monkeypatch):
    import ray
    from mlflow.tracking import MlflowClient
    from ray.tune import ExperimentAnalysis

    from test_pruning import SLEEP_ENV, SYNTHETIC_SPACE, synthetic_train

    from affseg.sweep.tuner import run_sweep

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv(SLEEP_ENV, "1.0")
    space = tmp_path / "synthetic.yaml"
    space.write_text(SYNTHETIC_SPACE)
    log = open(tmp_path / "driver.log", "w")
    driver = subprocess.Popen([sys.executable, "-c", DRIVER.format(tests=str(TESTS), space=str(space))],
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    storage = f"sqlite:///{tmp_path}/mlflow/optuna.db"
    deadline = time.monotonic() + KILL_TIMEOUT_S
    try:
        while not _finished(storage):
            assert time.monotonic() < deadline and driver.poll() is None, (tmp_path / "driver.log").read_text()
            time.sleep(0.2)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)  # the driver and the local Ray it started: a hard crash
        driver.wait()
        log.close()
    before = _finished(storage)  # trial number → state, as the dead driver left them
    assert before.get(0) == "COMPLETE"

    from affseg.config import ConfigError

    with pytest.raises(ConfigError, match="resume continues sweep synthetic-demo as started"):
        run_sweep(str(space), "demo", resume=True, overrides=["trials=9"], train_fn=synthetic_train)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:  # without overrides: the stored ones apply
        summary = run_sweep(str(space), "demo", resume=True, train_fn=synthetic_train)
    finally:
        ray.shutdown()

    assert summary.name == "synthetic-demo"
    study = optuna.load_study(study_name="synthetic-demo", storage=storage)
    ray_trials = {t.config["optuna_trial"]: t.status for t in ExperimentAnalysis(str(summary.path)).trials}
    assert len(ray_trials) == 5  # the budget: no trial lost, none added
    states = {t.number: t.state.name for t in study.trials}
    assert all(states[n] in ("COMPLETE", "PRUNED", "FAIL") for n in ray_trials)
    orphans = set(states) - set(ray_trials)  # asked by the dead driver after Ray's last snapshot
    assert all(states[n] == "FAIL" for n in orphans)
    assert {n: states[n] for n in before} == before  # finished trials kept their outcome
    drawn = [tuple(sorted(t.params.items())) for t in study.trials if t.number in ray_trials]
    assert len(set(drawn)) == len(drawn)  # the resumed sampler did not replay the first driver's draws

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow/mlflow.db")
    experiment_id = client.get_experiment_by_name("affseg").experiment_id
    runs = client.search_runs([experiment_id], "tags.`affseg.sweep` = 'synthetic-demo'")
    children = [int(r.data.tags["affseg.trial"]) for r in runs if r.data.tags["affseg.role"] == "trial"]
    assert len(children) == len(set(children))  # no duplicate child run after the resume
    assert set(ray_trials) <= set(children)
    assert sum(r.data.tags["affseg.role"] == "parent" for r in runs) == 1
    by_trial = {int(r.data.tags["affseg.trial"]): r for r in runs if r.data.tags["affseg.role"] == "trial"}
    steps = [m.step for m in client.get_metric_history(by_trial[0].info.run_id, "val/miou")]
    assert steps == [10, 20, 30, 40]
    for number in before:  # finished before the kill: never started again
        assert len(client.get_metric_history(by_trial[number].info.run_id, "start_iteration")) == 1
    expected = {"COMPLETE": "completed", "PRUNED": "pruned", "FAIL": "failed"}
    assert all(by_trial[n].data.tags["state"] == expected[states[n]] for n in by_trial)
    assert sum(summary.counts()[s] for s in ("completed", "pruned", "failed")) == len(states)


@pytest.mark.slow
def test_ctrl_c_ends_the_sweep_as_interrupted(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from test_pruning import SLEEP_ENV, SYNTHETIC_SPACE

    monkeypatch.setenv(SLEEP_ENV, "1.0")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    space = tmp_path / "synthetic.yaml"
    space.write_text(SYNTHETIC_SPACE)
    driver = subprocess.Popen([sys.executable, "-c", DRIVER.format(tests=str(TESTS), space=str(space))],
                              cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True)
    storage = f"sqlite:///{tmp_path}/mlflow/optuna.db"
    deadline = time.monotonic() + KILL_TIMEOUT_S
    try:
        while not _finished(storage):
            assert time.monotonic() < deadline and driver.poll() is None
            time.sleep(0.2)
        driver.send_signal(signal.SIGINT)  # Ctrl-C: Ray stops the trials and saves the experiment
        output, _ = driver.communicate(timeout=KILL_TIMEOUT_S)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
    assert "interrupted: continue with `make sweep ... RESUME=1`" in output, output
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow/mlflow.db")
    experiment_id = client.get_experiment_by_name("affseg").experiment_id
    (parent,) = client.search_runs([experiment_id], "tags.`affseg.role` = 'parent'")
    assert (parent.data.tags["state"], parent.info.status) == ("interrupted", "KILLED")


def test_report_prints_the_per_class_view(real_sweep, monkeypatch, capsys):
    from affseg.cli import main

    summary, work, _ = real_sweep
    monkeypatch.chdir(work)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(["report"]) == 0
    out = capsys.readouterr().out
    assert f"sweep {summary.name}: 2 trials (2 complete)" in out
    assert "per-class IoU (%) of the top 2 completed trials" in out and "background" in out
    assert "Hyperparameter importance" in out and "too few completed trials" in out  # 2 < 4 completed
    assert "Hyperparameter importance" in "\n".join(summary.lines())


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_ui_rest_calls_show_named_runs_in_the_training_view(real_sweep):
    """The REST calls the MLflow UI makes (experiment, search runs, get run) against `mlflow server` on 127.0.0.1."""
    import json
    import subprocess
    import sys
    import time
    import urllib.request

    summary, work, _ = real_sweep
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                               "--backend-store-uri", f"sqlite:///{work}/mlflow/mlflow.db", "--workers", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}/api/2.0/mlflow"

    def call(path: str, body: dict | None = None) -> dict:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(f"{base}/{path}", data=data, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    try:
        for _ in range(120):
            try:
                experiment = call(f"experiments/get?experiment_id={summary.experiment_id}")["experiment"]
                break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("mlflow server did not start")
        tags = {t["key"]: t["value"] for t in experiment.get("tags", [])}
        assert tags["mlflow.experimentKind"] == "custom_model_development"
        runs = call("runs/search", {"experiment_ids": [summary.experiment_id], "max_results": 50})["runs"]
        names = {r["info"]["run_name"] for r in runs}
        for record in summary.trials:
            run = call(f"runs/get?run_id={record.run_id}")["run"]
            name = run["info"]["run_name"]
            assert name in names and name.startswith(f"t{record.number:02d} {record.state} α=")
        parent = call(f"runs/get?run_id={summary.parent_run_id}")["run"]
        note = {t["key"]: t["value"] for t in parent["data"]["tags"]}["mlflow.note.content"]
        assert "best trial" in note and "savings:" in note and "Hyperparameter importance" in note
        assert "workflowType=machine_learning" in "\n".join(summary.lines())
    finally:
        server.terminate()
        server.wait(timeout=30)
