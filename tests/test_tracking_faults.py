"""MLflow tracking under faults: transient errors are retried, persistent ones become warnings (training goes
on), SQLite waits for its lock, and a validation logged again after a resume is logged once."""

from __future__ import annotations

import logging

import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking._tracking_service.utils import _get_store
from test_tracking import _config, _result, store  # noqa: F401  (store is a fixture)

from affseg.callbacks import TrainResult
from affseg.config import TrackingConfig
from affseg.sweep import tracking, trial_logging
from affseg.sweep.tracking import MlflowCallback, read_table, tracking_uri


@pytest.fixture
def sleeps(monkeypatch) -> list[float]:
    """The backoff delays asked for, without waiting."""
    delays: list[float] = []
    monkeypatch.setattr(tracking.time, "sleep", delays.append)
    return delays


def _failing(method, failures: int | None):
    """`method`, raising MlflowException on its first `failures` calls (every call when None); counts calls."""
    def call(*args, **kwargs):
        call.count += 1
        if failures is None or call.count <= failures:
            raise MlflowException("database is locked")
        return method(*args, **kwargs)
    call.count = 0
    return call


def test_transient_errors_are_retried_with_backoff(store, tmp_path, sleeps):
    client, ref = store
    callback = MlflowCallback(ref, 1, _config(tmp_path))
    callback.on_start(None, 0)
    flaky = _failing(callback.client.log_batch, failures=2)
    callback.client.log_batch = flaky
    callback.on_log(10, {"loss": 2.0})
    assert flaky.count == 3
    assert sleeps == [tracking.RETRY_BASE_DELAY_S, 2 * tracking.RETRY_BASE_DELAY_S]
    assert [(m.step, m.value) for m in client.get_metric_history(callback.run_id, "loss")] == [(10, 2.0)]


def test_persistent_failure_warns_and_training_continues(store, tmp_path, sleeps, caplog):
    client, ref = store
    callback = MlflowCallback(ref, 1, _config(tmp_path))
    callback.on_start(None, 0)
    healthy = callback.client.log_batch
    broken = _failing(healthy, failures=None)
    callback.client.log_batch = broken
    with caplog.at_level(logging.WARNING, logger=trial_logging.__name__):
        callback.on_log(10, {"loss": 2.0})  # must not raise
        callback.on_validation(_result(10, 0.3, tmp_path), tmp_path / "last.pt", True)
    assert broken.count == 2 * tracking.RETRY_ATTEMPTS
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2 and all("\n" not in m for m in messages)
    assert messages[0].startswith(f"MLflow logging failed after {tracking.RETRY_ATTEMPTS} attempts at iteration 10:")
    assert messages[0].endswith("database is locked; training continues")
    callback.client.log_batch = healthy  # the store recovers: the next logs go through
    callback.on_log(20, {"loss": 1.0})
    assert [m.step for m in client.get_metric_history(callback.run_id, "loss")] == [20]
    callback.client.set_terminated = _failing(callback.client.set_terminated, failures=None)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=trial_logging.__name__):
        callback.on_end(TrainResult(None, None, None, 20, False))
    assert [r.getMessage().split(":")[0] for r in caplog.records] == [
        f"MLflow logging failed after {tracking.RETRY_ATTEMPTS} attempts at iteration 20"]


def test_validation_logged_again_after_resume_is_logged_once(store, tmp_path):
    client, ref = store
    config = _config(tmp_path)
    first = MlflowCallback(ref, 3, config)
    first.on_start(config, 0)
    first.on_validation(_result(10, 0.2, tmp_path), tmp_path / "last.pt", True)
    first.on_validation(_result(20, 0.3, tmp_path), tmp_path / "last.pt", True)  # interrupted after logging
    again = MlflowCallback(ref, 3, config)  # RESUME=1 from the checkpoint before iteration 20
    again.on_start(config, 10)
    again.on_validation(_result(20, 0.3, tmp_path), tmp_path / "last.pt", True)
    again.on_validation(_result(30, 0.4, tmp_path), tmp_path / "last.pt", True)
    again.on_validation(_result(30, 0.4, tmp_path), tmp_path / "last.pt", True)  # same process, same step
    assert [m.step for m in client.get_metric_history(first.run_id, "val/miou")] == [10, 20, 30]
    assert [m.step for m in client.get_metric_history(first.run_id, "best/val/miou")] == [10, 20, 30]
    table = read_table(client, first.run_id, "tables/per_class_iou.json")
    assert table.groupby("iteration").size().to_dict() == {10: 21, 20: 21, 30: 21}


def test_table_row_missing_at_interrupt_is_added_on_resume(store, tmp_path, sleeps):
    client, ref = store
    config = _config(tmp_path)
    first = MlflowCallback(ref, 4, config)
    first.on_start(config, 0)
    first.client.log_table = _failing(first.client.log_table, failures=None)  # metrics logged, table not
    first.on_validation(_result(10, 0.2, tmp_path), tmp_path / "last.pt", True)
    again = MlflowCallback(ref, 4, config)
    again.on_start(config, 0)
    again.on_validation(_result(10, 0.2, tmp_path), tmp_path / "last.pt", True)
    assert [m.step for m in client.get_metric_history(first.run_id, "val/miou")] == [10]
    assert list(read_table(client, first.run_id, "tables/per_class_iou.json")["iteration"].unique()) == [10]


def test_sqlite_store_waits_for_its_lock(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = tracking_uri(TrackingConfig(mlflow_uri=f"sqlite:///{tmp_path}/mlflow.db"))
    assert uri == f"sqlite:///{tmp_path}/mlflow.db?timeout={tracking.SQLITE_BUSY_TIMEOUT_S}"
    engine = _get_store(uri).engine
    _, connect_kwargs = engine.dialect.create_connect_args(engine.url)
    assert connect_kwargs["timeout"] == tracking.SQLITE_BUSY_TIMEOUT_S
    assert tracking.with_busy_timeout(uri) == uri  # not added twice
    assert tracking.with_busy_timeout("sqlite:///x.db?mode=ro") == "sqlite:///x.db?mode=ro&timeout=30"
    assert tracking.with_busy_timeout("postgresql://db/mlflow") == "postgresql://db/mlflow"
