"""MLflow tracking of sweeps: one parent run per sweep, one child run per trial.

Everything goes through `MlflowClient` with explicit run ids (trials run in other processes, maybe on
other machines): no global active run. Runs are found again by tags, never created twice:
parent = (`affseg.sweep`, role parent), child = (`affseg.sweep`, `affseg.trial` = Optuna trial number).

Store: `TrackingConfig.mlflow_uri` (SQLite `mlflow/mlflow.db`) with artifacts under
`TrackingConfig.artifact_root`; the environment variable MLFLOW_TRACKING_URI (e.g. a tracking server)
overrides both.
"""

from __future__ import annotations

import logging
import math
import os
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import pandas as pd
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT, MLFLOW_PARENT_RUN_ID
from sqlalchemy.exc import OperationalError

from affseg.callbacks import Callback, TrainResult, ValidationResult
from affseg.config import Config, TrackingConfig, to_dict

log = logging.getLogger(__name__)

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
SQLITE_PREFIX = "sqlite:///"
SQLITE_BUSY_TIMEOUT_S = 30  # concurrent trials wait this long for SQLite's write lock instead of failing at once
SQLITE_TIMEOUT_PARAM = "timeout"  # URI query parameter SQLAlchemy's pysqlite dialect passes to sqlite3.connect

RETRY_ATTEMPTS = 4  # tries of one tracking call before a training-time logging failure becomes a warning
RETRY_BASE_DELAY_S = 0.5  # waits 0.5, 1, 2 s between the tries
RETRYABLE = (MlflowException, OperationalError, OSError)  # OSError covers requests' connection errors
# log_table and promotion download artifacts; their progress bars would flood trial logs.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def absolute_uri(uri: str) -> str:
    """`sqlite:///relative.db` → `sqlite:////abs/relative.db` (trials run in other working directories);
    creates the database's folder. Other URIs are returned unchanged."""
    if not uri.startswith(SQLITE_PREFIX):
        return uri
    path = Path(uri[len(SQLITE_PREFIX):]).expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"{SQLITE_PREFIX}{path}"


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


def _find(client: MlflowClient, experiment_id: str, tags: dict[str, str]) -> list:
    query = tag_filter(tags)
    return client.search_runs([experiment_id], filter_string=query, order_by=["attributes.start_time ASC"])


def sweep_exists(client: MlflowClient, experiment_id: str, sweep: str) -> bool:
    return bool(_find(client, experiment_id, {SWEEP_TAG: sweep}))


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
    found = _find(client, experiment_id, {SWEEP_TAG: sweep, ROLE_TAG: "parent"})
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
    found = _find(client, ref.experiment_id, {SWEEP_TAG: ref.sweep, TRIAL_TAG: str(trial_number)})
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


def _metrics(values: dict[str, float], step: int) -> list[Metric]:
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


class MlflowCallback(Callback):
    """Logs one trial into its child run: params, losses and lr, validation metrics, the per-class IoU
    table, figures, the best checkpoint, and `state` = completed | pruned | failed.

    Every tracking call is retried (`retrying`); one that still fails is logged as a warning and training
    goes on. Each validation iteration is logged once, also when a resumed trial validates it again."""

    def __init__(self, ref: TrackingRef, trial_number: int, config: Config | None, params: dict | None = None):
        self.ref, self.trial_number, self.config, self.params = ref, trial_number, config, params
        self.client = ref.client()
        self._run_id: str | None = None
        self._metric_steps: set[int] | None = None  # steps of `val/miou` already in the run
        self._table_iterations: set[int] | None = None  # iterations already in PER_CLASS_TABLE

    @property
    def run_id(self) -> str:
        if self._run_id is None:
            self._run_id = retrying(child_run, self.ref, self.trial_number, self.config, self.params)
        return self._run_id

    def _call(self, method: str, *args: object, **kwargs: object) -> object:
        return retrying(getattr(self.client, method), *args, **kwargs)

    def _guarded(self, iteration: int, action: Callable[[], None]) -> None:
        """Run `action`; a tracking error that outlasted its retries becomes a one-line warning."""
        try:
            action()
        except RETRYABLE as error:
            log.warning("MLflow logging failed after %d attempts at iteration %d: %s; training continues",
                        RETRY_ATTEMPTS, iteration, f"{type(error).__name__}: {error}".splitlines()[0])

    def on_start(self, config: object, start_iteration: int) -> None:
        def start() -> None:
            self._call("update_run", self.run_id, status="RUNNING")
            retrying(set_state, self.client, self.run_id, "running")
            self._call("log_batch", self.run_id, metrics=_metrics({START_ITERATION: start_iteration}, start_iteration))
        self._guarded(start_iteration, start)

    def on_log(self, iteration: int, values: dict[str, float]) -> None:
        self._guarded(iteration, lambda: self._call("log_batch", self.run_id, metrics=_metrics(values, iteration)))

    def _logged_steps(self) -> set[int]:
        """Steps of `val/miou` the run already holds (read once: a resumed trial validates some again)."""
        if self._metric_steps is None:
            history = self._call("get_metric_history", self.run_id, VAL_MIOU)
            self._metric_steps = {m.step for m in history}
        return self._metric_steps

    def _tabled_iterations(self) -> set[int]:
        """Iterations PER_CLASS_TABLE already holds (read once)."""
        if self._table_iterations is None:
            folder, name = os.path.split(PER_CLASS_TABLE)
            names = {Path(a.path).name for a in self._call("list_artifacts", self.run_id, folder)}
            table = retrying(read_table, self.client, self.run_id, PER_CLASS_TABLE) if name in names else None
            self._table_iterations = set() if table is None else {int(i) for i in table["iteration"]}
        return self._table_iterations

    def on_validation(self, result: ValidationResult, checkpoint: Path, is_best: bool) -> None:
        def validate() -> None:
            if result.iteration not in self._logged_steps():
                metrics = result.metrics() | ({BEST_MIOU: result.miou} if is_best else {})
                self._call("log_batch", self.run_id, metrics=_metrics(metrics, result.iteration))
                self._metric_steps.add(result.iteration)
            if result.iteration not in self._tabled_iterations():
                table = result.per_class.assign(iteration=result.iteration)[["iteration", "class", "iou"]]
                self._call("log_table", self.run_id, table, PER_CLASS_TABLE)
                self._table_iterations.add(result.iteration)
            for path in result.figures.values():  # same name again: replaced, not duplicated
                self._call("log_artifact", self.run_id, str(path), FIGURES_DIR)
        self._guarded(result.iteration, validate)

    def on_end(self, result: TrainResult) -> None:
        def end() -> None:
            if result.best_checkpoint is not None and Path(result.best_checkpoint).is_file():
                self._call("log_artifact", self.run_id, str(result.best_checkpoint), CHECKPOINT_DIR)
            retrying(set_state, self.client, self.run_id, "pruned" if result.stopped_early else "completed")
        self._guarded(result.iterations_done, end)

    def mark_failed(self, error: BaseException) -> None:
        """Called by the trainable when training raised."""
        self._guarded(-1, lambda: retrying(set_state, self.client, self.run_id, "failed",
                                           f"{type(error).__name__}: {error}"))


# ---------------------------------------------------------------- the parent's summary


@dataclass
class TrialRecord:
    """One trial as the sweep summary sees it (Optuna's outcome, MLflow's run)."""

    number: int
    state: str  # completed | pruned | failed | running
    value: float | None  # the objective (best sweep metric) when completed, last value when pruned
    params: dict
    run_id: str | None
    pseudo: dict[str, float] = field(default_factory=dict)  # pseudo-label mIoU (cam, cam_par, refined) at its best


def child_runs(client: MlflowClient, experiment_id: str, sweep: str) -> dict[int, object]:
    """Optuna trial number → child run (the first one when, against the rules, there are several)."""
    runs: dict[int, object] = {}
    for run in _find(client, experiment_id, {SWEEP_TAG: sweep, ROLE_TAG: "trial"}):
        runs.setdefault(int(run.data.tags[TRIAL_TAG]), run)
    return runs


def sync_states(client: MlflowClient, records: list[TrialRecord]) -> None:
    """Make every child run's state tag and name agree with Optuna's outcome (covers trials whose worker died)."""
    for record in records:
        if record.run_id is None or record.state == "running":
            continue
        client.update_run(record.run_id, name=run_label(record.number, record.state, record.params))
        run = client.get_run(record.run_id)
        if run.data.tags.get(STATE_TAG) != record.state or run.info.status == "RUNNING":
            set_state(client, record.run_id, record.state)


def finish_parent(client: MlflowClient, ref: TrackingRef, records: list[TrialRecord], metric: str,
                  best: TrialRecord | None, state: str = "completed") -> None:
    """Log the trials table, the curves figure and the best trial onto the parent run, and close it with
    `state` (completed, or interrupted when the budget is not spent)."""
    rows = [{"trial": r.number, "state": r.state, "objective": r.value, **r.pseudo, "run_id": r.run_id or "",
             **{k: str(v) for k, v in r.params.items()}} for r in records]
    if rows:
        replace_table(client, ref.parent_run_id, pd.DataFrame(rows), TRIALS_TABLE)
    curves = {r.number: client.get_metric_history(r.run_id, metric) for r in records if r.run_id}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / CURVES_FIGURE
        plot_curves({n: [(m.step, m.value) for m in h] for n, h in curves.items()},
                    {r.number: r.state for r in records}, metric, path)
        client.log_artifact(ref.parent_run_id, str(path))
    if best is not None:
        tags = [RunTag(f"{BEST_PREFIX}{k}", str(v)) for k, v in best.params.items()]
        tags += [RunTag("best_trial", str(best.number)), RunTag("best_run_id", best.run_id or "")]
        client.log_batch(ref.parent_run_id, metrics=_metrics({f"best/{metric}": best.value}, 0), tags=tags)
    set_state(client, ref.parent_run_id, state)


def log_savings(client: MlflowClient, parent_run_id: str, savings) -> None:
    """The `savings/*` metrics and the savings table (`affseg.sweep.savings`) on the parent run."""
    retrying(client.log_batch, parent_run_id, metrics=_metrics(savings.metrics(), 0))
    replace_table(client, parent_run_id, savings.table(), SAVINGS_TABLE)


STATE_COLOURS = {"completed": "tab:blue", "pruned": "tab:orange", "failed": "tab:red", "running": "tab:gray"}


def plot_curves(curves: dict[int, list[tuple[int, float]]], states: dict[int, str], metric: str, path: Path) -> None:
    """One line per trial: `metric` against training iteration, coloured by final state."""
    from matplotlib.figure import Figure  # object API: no pyplot state, no backend switch

    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    for number, points in sorted(curves.items()):
        if not points:
            continue
        steps, values = zip(*sorted(points))
        ax.plot(steps, values, marker="o", markersize=3, color=STATE_COLOURS[states.get(number, "running")], alpha=0.8)
        ax.annotate(str(number), (steps[-1], values[-1]), fontsize=7)
    for state, colour in STATE_COLOURS.items():
        ax.plot([], [], color=colour, label=state)
    ax.set_xlabel("iteration")
    ax.set_ylabel(metric)
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
