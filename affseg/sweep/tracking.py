"""MLflow tracking of sweeps: one parent run per sweep, one child run per trial.

Everything goes through `MlflowClient` with explicit run ids (trials run in other processes, maybe on
other machines): no global active run. Runs are found again by tags, never created twice:
parent = (`affseg.sweep`, role parent), child = (`affseg.sweep`, `affseg.trial` = Optuna trial number).

Store: `TrackingConfig.mlflow_uri` (SQLite `mlflow/mlflow.db`) with artifacts under
`TrackingConfig.artifact_root`; the environment variable MLFLOW_TRACKING_URI (e.g. a tracking server)
overrides both.

This module holds the store, the runs and their tags; what a trial logs is `affseg.sweep.trial_logging`,
what the driver writes at the end `affseg.sweep.sweep_results`.
"""

from __future__ import annotations

import importlib
import math
import os
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pandas as pd
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT, MLFLOW_PARENT_RUN_ID
from sqlalchemy.exc import OperationalError

from affseg.config import Config, TrackingConfig, to_dict
from affseg.sweep.uris import SQLITE_PREFIX, absolute_uri

SWEEP_TAG = "affseg.sweep"
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
UI_VIEW_QUERY = "workflowType=machine_learning"
UI_BASE = "http://127.0.0.1:5000"  # `make mlflow-ui`
TRIAL_TAG = "affseg.trial"
ROLE_TAG = "affseg.role"  # parent | trial
STATE_TAG = "state"  # trials: running | completed | pruned | failed; parents: running | completed | interrupted
RUN_STATUS = {"failed": "FAILED", "interrupted": "KILLED"}  # MLflow run status per final state; else FINISHED
ERROR_TAG = "error"
BEST_PREFIX = "best."  # parent tags best.<config key> = the best trial's value
VAL_MIOU = "val/miou"  # child metric, one point per validation: how already-logged validations are found
BEST_MIOU = "best/val/miou"  # child metric: val mIoU of the best checkpoint so far (train picks it by mIoU)
START_ITERATION = "start_iteration"  # child metric, one point per (re)start: > 0 after resuming a checkpoint

PER_CLASS_TABLE = "tables/per_class_iou.json"  # one row per (iteration, class), appended each validation
TRIALS_TABLE = "tables/trials.json"  # parent: one row per trial
SAVINGS_TABLE = "tables/savings.json"  # parent: trial-iterations, device-seconds, teacher passes vs unpruned
CURVES_FIGURE = "val_curves.png"  # parent: the sweep metric against iteration, every trial
CHECKPOINT_DIR = "checkpoint"  # child: the best training checkpoint (best.pt)
FIGURES_DIR = "figures"
SPACE_DIR = "space"
BATCH_LIMIT = 100  # MLflow accepts at most this many params per log_batch call
ERROR_TAG_CHARS = 500

TRACKING_ENV = "MLFLOW_TRACKING_URI"
SQLITE_BUSY_TIMEOUT_S = 30  # concurrent trials wait this long for SQLite's write lock instead of failing at once
SQLITE_TIMEOUT_PARAM = "timeout"  # URI query parameter SQLAlchemy's pysqlite dialect passes to sqlite3.connect

RETRY_ATTEMPTS = 4  # tries of one tracking call before a training-time logging failure becomes a warning
RETRY_BASE_DELAY_S = 0.5  # waits 0.5, 1, 2 s between the tries
RETRYABLE = (MlflowException, OperationalError, OSError)  # OSError covers requests' connection errors
# log_table and promotion download artifacts; their progress bars would flood trial logs.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def with_busy_timeout(uri: str, seconds: float = SQLITE_BUSY_TIMEOUT_S) -> str:
    """`sqlite:///x.db` → `sqlite:///x.db?timeout=30`: MLflow hands the URI to `sqlalchemy.create_engine`,
    whose pysqlite dialect gives `timeout` to `sqlite3.connect`. A timeout already there, or another
    store, is left alone."""
    if not uri.startswith(SQLITE_PREFIX):
        return uri
    _, _, query = uri.partition("?")
    if any(part.split("=")[0] == SQLITE_TIMEOUT_PARAM for part in query.split("&")):
        return uri
    return f"{uri}{'&' if query else '?'}{SQLITE_TIMEOUT_PARAM}={seconds:g}"


def tracking_uri(cfg: TrackingConfig) -> str:
    """The store to track into: MLFLOW_TRACKING_URI or `cfg.mlflow_uri`, absolute, with a SQLite busy timeout."""
    return with_busy_timeout(absolute_uri(os.environ.get(TRACKING_ENV) or cfg.mlflow_uri))


T = TypeVar("T")


def retrying(call: Callable[..., T], *args: object, attempts: int = RETRY_ATTEMPTS,
             base_delay: float = RETRY_BASE_DELAY_S, **kwargs: object) -> T:
    """`call(*args, **kwargs)`, tried again after a transient tracking error (`RETRYABLE`) with exponential
    backoff (`base_delay`, 2 × `base_delay`, ...); the last attempt's error is raised."""
    for attempt in range(attempts):
        try:
            return call(*args, **kwargs)
        except RETRYABLE:
            if attempt == attempts - 1:
                raise
            time.sleep(base_delay * 2 ** attempt)
    raise ValueError(f"retrying: attempts={attempts} must be >= 1")


def _local_store(uri: str) -> bool:
    return uri.startswith(SQLITE_PREFIX) or uri.startswith("file:") or "://" not in uri


@dataclass(frozen=True)
class TrackingRef:
    """Where a sweep's runs live (picklable, sent to every trial)."""

    uri: str
    experiment_id: str
    sweep: str
    parent_run_id: str

    def client(self) -> MlflowClient:
        return MlflowClient(self.uri)


def open_experiment(cfg: TrackingConfig) -> tuple[MlflowClient, str]:
    """The client and id of experiment `cfg.experiment`, created when missing (artifacts under
    `cfg.artifact_root` for a local store; a server chooses its own)."""
    uri = tracking_uri(cfg)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(cfg.experiment)
    if experiment is not None:
        experiment_id = experiment.experiment_id
    else:
        location = None
        if _local_store(uri):
            root = Path(cfg.artifact_root).expanduser().resolve()
            root.mkdir(parents=True, exist_ok=True)
            location = root.as_uri()
        experiment_id = client.create_experiment(cfg.experiment, artifact_location=location)
    if (experiment.tags if experiment else {}).get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
        client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)  # the training view, not GenAI
    return client, experiment_id


def ui_link(base: str, experiment_id: str, run_id: str | None = None) -> str:
    """A link into the MLflow UI that opens the model-training view (MLflow 3.17 picks the view from a
    browser setting unless the URL names it)."""
    page = f"experiments/{experiment_id}" + (f"/runs/{run_id}" if run_id else "")
    return f"{base.rstrip('/')}/#/{page}?{UI_VIEW_QUERY}"


def quote_filter_value(value: str) -> str:
    """`value` as a string literal of an MLflow filter: in single quotes, or double quotes when it holds a
    single quote. MLflow's filter grammar has no escape, so a value holding both cannot be searched for."""
    for quote in ("'", '"'):
        if quote not in value:
            return f"{quote}{value}{quote}"
    raise ValueError(f"{value!r}: a name holding both ' and \" cannot be searched for in MLflow; rename it")


def tag_filter(tags: dict[str, str]) -> str:
    """MLflow filter string matching every (tag, value) pair of `tags`."""
    return " AND ".join(f"tags.`{key}` = {quote_filter_value(str(value))}" for key, value in tags.items())


def find_runs(client: MlflowClient, experiment_id: str, tags: dict[str, str]) -> list:
    query = tag_filter(tags)
    return client.search_runs([experiment_id], filter_string=query, order_by=["attributes.start_time ASC"])


def sweep_exists(client: MlflowClient, experiment_id: str, sweep: str) -> bool:
    return bool(find_runs(client, experiment_id, {SWEEP_TAG: sweep}))


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def parent_run(client: MlflowClient, experiment_id: str, sweep: str, spec_files: Iterable[Path],
               settings: dict[str, object]) -> str:
    """The sweep's parent run id; created (with the space files, settings and git commit) only once."""
    found = find_runs(client, experiment_id, {SWEEP_TAG: sweep, ROLE_TAG: "parent"})
    if found:
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        return run_id
    tags = {SWEEP_TAG: sweep, ROLE_TAG: "parent", MLFLOW_GIT_COMMIT: git_commit(), STATE_TAG: "running"}
    run_id = client.create_run(experiment_id, tags=tags, run_name=sweep).info.run_id
    client.log_batch(run_id, params=[Param(k, str(v)) for k, v in settings.items()])
    for path in spec_files:
        client.log_artifact(run_id, str(path), SPACE_DIR)
    return run_id


# Short names of swept keys in run names (`t03 pruned α=2 box=.48 bg=pow1.2`); other keys use their last part.
SHORT_KEYS = {"refine.alpha": "α", "refine.box_threshold": "box", "refine.deviation": "dev", "loss.lam": "λ",
              "optim.lr": "lr", "optim.warmup_iters": "warm", "model.decoder_stages": "dec",
              "model.affinity_stages": "affst"}
BACKGROUND_KEYS = {"power": ("pow", "refine.bg_power"), "constant": ("const", "refine.bg_score")}


def _short_value(value: object) -> str:
    if isinstance(value, float):
        text = f"{value:.3g}"
        return text[1:] if text.startswith("0.") else text
    return str(value)


def run_label(number: int, state: str, params: dict) -> str:
    """What a trial's run is, as its MLflow run name: number, state and the swept values in short form."""
    parts = [f"t{number:02d}", state]
    for key, value in params.items():
        if key == "refine.background":
            prefix, detail = BACKGROUND_KEYS.get(value, (str(value), ""))
            parts.append(f"bg={prefix}{_short_value(params[detail]) if detail in params else ''}")
        elif key not in ("refine.bg_power", "refine.bg_score"):
            parts.append(f"{SHORT_KEYS.get(key, key.rsplit('.', 1)[-1])}={_short_value(value)}")
    return " ".join(parts)


def child_run(ref: TrackingRef, trial_number: int, config: Config | None = None, params: dict | None = None) -> str:
    """The child run of Optuna trial `trial_number`: found by tags, or created with all config params and
    named by `run_label` from the swept `params`."""
    client = ref.client()
    found = find_runs(client, ref.experiment_id, {SWEEP_TAG: ref.sweep, TRIAL_TAG: str(trial_number)})
    if found:
        return found[0].info.run_id
    tags = {SWEEP_TAG: ref.sweep, TRIAL_TAG: str(trial_number), ROLE_TAG: "trial", MLFLOW_PARENT_RUN_ID: ref.parent_run_id,
            STATE_TAG: "running"}
    run_name = run_label(trial_number, "running", params or {})
    run_id = client.create_run(ref.experiment_id, tags=tags, run_name=run_name).info.run_id
    if config is not None:
        params = [Param(k, str(v)) for k, v in flatten(to_dict(config)).items()]
        for start in range(0, len(params), BATCH_LIMIT):
            client.log_batch(run_id, params=params[start:start + BATCH_LIMIT])
    return run_id


def flatten(values: dict, prefix: str = "") -> dict[str, object]:
    """{"refine": {"alpha": 2}} → {"refine.alpha": 2}."""
    flat: dict[str, object] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def to_metrics(values: dict[str, float], step: int) -> list[Metric]:
    now = int(time.time() * 1000)
    return [Metric(key, float(value), now, step) for key, value in values.items() if math.isfinite(float(value))]


def read_table(client: MlflowClient, run_id: str, artifact_file: str) -> pd.DataFrame:
    """A table written by `log_table` (all appended rows) as a DataFrame."""
    with tempfile.TemporaryDirectory() as tmp:
        path = client.download_artifacts(run_id, artifact_file, tmp)
        return pd.read_json(path, orient="split")


def replace_table(client: MlflowClient, run_id: str, table: pd.DataFrame, artifact_file: str) -> None:
    """Like `log_table`, but a table already there (a resumed sweep finishing again) is replaced, not appended to."""
    folder, name = os.path.split(artifact_file)
    if name not in {Path(a.path).name for a in client.list_artifacts(run_id, folder or None)}:
        client.log_table(run_id, table, artifact_file)
        return
    with tempfile.TemporaryDirectory() as tmp:
        table.to_json(Path(tmp) / name, orient="split", index=False, date_format="iso")
        client.log_artifact(run_id, str(Path(tmp) / name), folder or None)


def set_state(client: MlflowClient, run_id: str, state: str, error: str | None = None) -> None:
    """Tag the run's state and, unless it is running, close it with the matching MLflow status."""
    tags = [RunTag(STATE_TAG, state)] + ([RunTag(ERROR_TAG, error[:ERROR_TAG_CHARS])] if error else [])
    client.log_batch(run_id, tags=tags)
    if state != "running":
        client.set_terminated(run_id, status=RUN_STATUS.get(state, "FINISHED"))


# Moved out by side and re-exported for `from affseg.sweep.tracking import ...`; looked up on first use,
# since those modules import this one.
_MOVED = {
    "MlflowCallback": "affseg.sweep.trial_logging",
    "TrialRecord": "affseg.sweep.sweep_results", "child_runs": "affseg.sweep.sweep_results",
    "finish_parent": "affseg.sweep.sweep_results", "sync_states": "affseg.sweep.sweep_results",
}


def __getattr__(name: str) -> object:
    if name in _MOVED:
        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
