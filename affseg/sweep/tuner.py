"""`run_sweep`: a Ray Tune experiment over a sweep space, searched by Optuna, tracked in MLflow.

Driver: load + validate the space (a bad file stops here), build the demo set once, open the MLflow
parent run and the Optuna study, then `Tuner.fit()` with `OptunaBridge` as searcher. One trial =
`run_trial`: the full training loop with two callbacks (MLflow child run, Tune reporting + pruning),
resumed from Ray's last checkpoint when its worker died. Ray's own console output is off; one line
per trial event is printed instead, and a summary at the end.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import optuna
import pandas as pd
import ray
from ray import tune

from affseg.backbones.demo_weights import RANDOM_WEIGHTS
from affseg.callbacks import Callback, ValidationResult
from affseg.config import Config, ConfigError
from affseg.sweep import analysis
from affseg.sweep.analysis import IOU_PREFIX, PSEUDO_PREFIX
from affseg.sweep.groups import members_of
from affseg.sweep.savings import TIME_KEY, RayTrial, Savings, sweep_savings
from affseg.sweep.pruning import (
    OBJECTIVE_KEY, PRUNED_KEY, OptunaBridge, StudyRef, TrialLink, absolute_storage, create_study, member_key,
    open_storage,
)
from affseg.sweep.space import PROFILES_DIR, SweepSpec, load_space
from affseg.sweep.tracking import (
    MlflowCallback, TrackingRef, TrialRecord, absolute_uri, child_runs, finish_parent, log_savings, open_experiment,
    CURVES_FIGURE, UI_BASE, parent_run, retrying, sweep_exists, sync_states, tracking_uri, ui_link,
)
from affseg.engine.checkpoint import BEST_CHECKPOINT, LAST_CHECKPOINT
from affseg.engine.trainer import ensure_dataset

SWEEP_ROOT = "runs/sweeps"  # Ray Tune experiments, one folder per sweep (relative to the working dir)
SWEEP_ROOT_ENV = "AFFSEG_SWEEP_ROOT"  # overrides SWEEP_ROOT; on a cluster, a shared filesystem path
TRAIN_DIR = "train"  # train.out_dir inside the trial's node-local working folder (removed when it ends)
STAGE_DIR = "tune_checkpoint"  # inside train.out_dir: what each report hands to Ray as its checkpoint
OBJECTIVE_FILE = "objective.json"  # in each Ray checkpoint: the running best, restored with the trial
CHECKPOINTS_KEPT = 1  # Ray keeps only the latest trial checkpoint (each holds last.pt and best.pt)
SPEC_FILE = "affseg_sweep.pkl"  # in the sweep's Ray folder: the SweepSpec and overrides it was started with
# Driver-side Ray Tune settings (a user's own environment wins): our progress lines replace Ray's
# tables and trial tracebacks; the experiment snapshot is at most 2 s stale when the driver dies.
RAY_DRIVER_ENV = {
    "RAY_AIR_NEW_OUTPUT": "0", "TUNE_PRINT_ALL_TRIAL_ERRORS": "0", "TUNE_GLOBAL_CHECKPOINT_S": "2",
    "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",
}
ITERATION_KEY = "iteration"
RAY_ADDRESS_ENV = "RAY_ADDRESS"
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
UI_COMMAND = "make mlflow-ui"
NOTE_TAG = "mlflow.note.content"  # a run's description in the MLflow UI
STATE_NAMES = {
    optuna.trial.TrialState.COMPLETE: "completed", optuna.trial.TrialState.PRUNED: "pruned",
    optuna.trial.TrialState.FAIL: "failed", optuna.trial.TrialState.RUNNING: "running",
    optuna.trial.TrialState.WAITING: "running",
}


# ---------------------------------------------------------------- the trial side


@dataclass(frozen=True)
class TrialContext:
    """What every trial needs besides its sampled parameters (picklable)."""

    spec: SweepSpec
    study: StudyRef
    tracking: TrackingRef
    train_fn: Callable | None = None  # None: affseg.train.train; tests pass a synthetic loop


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


class TuneReporter(Callback):
    """Reports every validation to Ray Tune with a checkpoint, and asks the Optuna pruner.

    The verdict is returned by `should_stop()` and reported as `pruned`. Pruning at the final
    validation is not pruning (training ends there anyway), so it is never reported there.
    A member of a fused group hands its report to the group's `sink` (`affseg.sweep.groups.GroupSink`),
    which reports all members of one validation together.
    """

    def __init__(self, link: TrialLink, metric: str, mode: str, out_dir: Path, objective: float | None = None,
                 sink: Callable[["TuneReporter", dict, Path], None] | None = None):
        self.link, self.metric, self.mode, self.out_dir = link, metric, mode, out_dir
        self.objective = objective
        self.sink = sink or _report_alone
        self.total = 0
        self.prune = False

    def on_start(self, config: Config, start_iteration: int) -> None:
        self.total = config.train.iterations

    def on_validation(self, result: ValidationResult, checkpoint: Path, is_best: bool) -> None:
        metrics = result.metrics()
        value = metrics.get(self.metric, float("nan"))
        if self.objective is None or (value > self.objective if self.mode == "max" else value < self.objective):
            self.objective = value
            self.link.record_best({k: v for k, v in metrics.items() if k.startswith((IOU_PREFIX, PSEUDO_PREFIX))})
        signal = metrics.get(self.link.signal or self.metric, float("nan"))  # what the pruner reads
        self.prune = self.link.should_prune(result.iteration, signal) and result.iteration < self.total
        report = {**metrics, ITERATION_KEY: result.iteration, OBJECTIVE_KEY: self.objective,
                  PRUNED_KEY: float(self.prune)}
        self.sink(self, report, checkpoint)

    def stage(self, last: Path, stage: Path | None = None) -> Path:
        """A folder (default `out_dir/STAGE_DIR`) with last.pt, best.pt and the running objective (hard links
        where possible)."""
        stage = stage or self.out_dir / STAGE_DIR
        shutil.rmtree(stage, ignore_errors=True)
        stage.mkdir(parents=True)
        for path in (last, last.parent / BEST_CHECKPOINT):
            if path.is_file():
                _link_or_copy(path, stage / path.name)
        (stage / OBJECTIVE_FILE).write_text(json.dumps({OBJECTIVE_KEY: self.objective}))
        return stage

    def should_stop(self) -> bool:
        return self.prune


def _report_alone(reporter: TuneReporter, report: dict, checkpoint: Path) -> None:
    tune.report(report, checkpoint=tune.Checkpoint.from_directory(str(reporter.stage(checkpoint))))


def _restore(out_dir: Path) -> tuple[Path | None, float | None]:
    """Copy Ray's last checkpoint of this trial (if any) into `out_dir`: (last.pt to resume from, objective)."""
    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return None, None
    checkpoint.to_directory(str(out_dir))
    objective = json.loads((out_dir / OBJECTIVE_FILE).read_text())[OBJECTIVE_KEY]
    return out_dir / LAST_CHECKPOINT, objective


def trial_scratch() -> Path:
    """The trial's node-local working folder. Not `get_trial_dir()`: for a function trainable that is
    the driver staging folder, which Ray re-uploads every few seconds while we write temporaries
    (last.pt.tmp, tune_checkpoint/) into it, logging a FileNotFoundError traceback when one vanishes.
    The working folder is synced only with `SyncConfig(sync_artifacts=True)`, which we never set."""
    return Path(tune.get_context().get_storage().trial_working_directory)


def run_trial(trial_config: dict, context: TrialContext) -> None:
    """The Ray Tune trainable: one training run with the trial's parameters (a fused group: `run_group`)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if "members" in trial_config:
        from affseg.sweep.groups import run_group

        run_group(trial_config["members"], context)
        return
    number = trial_config["optuna_trial"]
    link = TrialLink(context.study, number)
    if link.finished():  # a restored sweep re-queued a trial whose outcome Optuna already has
        return
    out_dir = trial_scratch() / TRAIN_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    tracker = MlflowCallback(context.tracking, number, None, trial_config["params"])
    try:
        config = context.spec.trial_config(trial_config["params"], {"train.out_dir": str(out_dir)})
        tracker.config = config
        resume_from, objective = _restore(out_dir)
        reporter = TuneReporter(link, context.spec.metric, context.spec.mode, out_dir, objective)
        train_fn = context.train_fn
        if train_fn is None:
            from affseg.train import train as train_fn
        train_fn(config, [tracker, reporter], resume_from=resume_from)
    except Exception as err:
        tracker.mark_failed(err)
        raise
    # The trial's folder is node-local scratch: its checkpoints live on in Ray's storage and MLflow.
    shutil.rmtree(out_dir, ignore_errors=True)


# ---------------------------------------------------------------- the driver side


class ProgressPrinter(tune.Callback):
    """One line per trial event: start (params), each validation, and the final state."""

    def __init__(self, metric: str):
        self.metric = metric
        self.ended: set[int] = set()  # members of fused groups already reported pruned

    @staticmethod
    def _print(text: str) -> None:
        print(text, flush=True)

    @staticmethod
    def _members(trial) -> list[tuple[int, Callable[[str], str]]]:
        """(Optuna number, result key of that member) for each trial a Ray trial trains."""
        if "members" not in trial.config:
            return [(trial.config["optuna_trial"], lambda key: key)]
        return [(m["optuna_trial"], lambda key, n=m["optuna_trial"]: member_key(n, key))
                for m in trial.config["members"]]

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        fused = f", fused group {trial.trial_id}" if "members" in trial.config else f" ({trial.trial_id})"
        for member in members_of(trial.config):
            params = ", ".join(f"{k}={_short(v)}" for k, v in member["params"].items())
            self._print(f"trial {member['optuna_trial']:>3}{fused} started: {params}")

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        for number, key in self._members(trial):
            if key(ITERATION_KEY) not in result:
                continue
            pruned = result.get(key(PRUNED_KEY))
            if pruned and "members" in trial.config:
                self.ended.add(number)
            self._print(f"trial {number:>3}  iter {result.get(key(ITERATION_KEY), 0):>6}  "
                        f"{self.metric} {result.get(key(self.metric), float('nan')):.4f}  "
                        f"best {result.get(key(OBJECTIVE_KEY), float('nan')):.4f}{'  -> pruned' if pruned else ''}")

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        result = trial.last_result or {}
        for number, key in self._members(trial):
            if number in self.ended:
                continue
            state = "pruned" if result.get(key(PRUNED_KEY)) else "completed"
            self._print(f"trial {number:>3} {state}: best {self.metric} {result.get(key(OBJECTIVE_KEY), float('nan')):.4f}")

    def on_trial_recover(self, iteration, trials, trial, **info) -> None:
        for number, _ in self._members(trial):
            self._print(f"trial {number:>3} lost its worker or raised; restarting from its last checkpoint")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        text = Path(trial.error_file).read_text() if trial.error_file and Path(trial.error_file).is_file() else ""
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        for number, _ in self._members(trial):
            self._print(f"trial {number:>3} failed: {lines[-1] if lines else 'see the Ray trial folder'}")


def _short(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def trial_dirname(trial) -> str:
    if "members" in trial.config:
        return f"group_{trial.config['members'][0]['optuna_trial']:03d}_{trial.trial_id}"
    return f"trial_{trial.config['optuna_trial']:03d}_{trial.trial_id}"


@dataclass
class SweepSummary:
    """The outcome of a sweep: every trial (Optuna's state, MLflow's run) and the best one."""

    name: str
    path: Path  # the Ray Tune experiment folder
    parent_run_id: str
    experiment_id: str
    metric: str
    trials: list[TrialRecord]
    best: TrialRecord | None
    best_per_class: pd.DataFrame | None  # columns class, iou at the best trial's best validation (present classes)
    interrupted: bool  # stopped (Ctrl-C) before the budget was spent: resume it
    savings: Savings | None = None  # what pruning and fusing saved
    class_report: list[str] = dataclasses.field(default_factory=list)  # per-class IoU and importance tables

    def counts(self) -> dict[str, int]:
        counts = {"completed": 0, "pruned": 0, "failed": 0, "running": 0}
        for record in self.trials:
            counts[record.state] += 1
        return counts

    def _trials_table(self) -> list[str]:
        """Every trial's state, objective and pseudo-label mIoU at its best validation (%), best first."""
        rows = [{"trial": r.number, "state": r.state, self.metric: r.value,
                 **{k.removeprefix(PSEUDO_PREFIX): v for k, v in r.pseudo.items()}} for r in self.trials]
        if not rows:
            return []
        table = pd.DataFrame(rows).sort_values(self.metric, ascending=False, na_position="last")
        numeric = table.select_dtypes("number").columns.drop("trial")
        table[numeric] = (100 * table[numeric]).round(1)
        return ["trials (%; pseudo-label mIoU at each trial's best validation):", table.to_string(index=False)]

    def description(self) -> str:
        """The parent run's description (markdown): the terminal summary and the figures beside it."""
        figures = [CURVES_FIGURE, analysis.IOU_HEATMAP, analysis.IMPORTANCE_HEATMAP]
        return "\n".join(["```", *self.lines(), "```", "Figures (artifacts of this run): " + ", ".join(figures)])

    def lines(self) -> list[str]:
        counts = ", ".join(f"{n} {state}" for state, n in self.counts().items() if n)
        lines = [f"sweep {self.name}: {len(self.trials)} trials ({counts}); Ray results in {self.path}"]
        if self.best is None:
            lines.append("no trial completed")
        else:
            lines.append(f"best trial {self.best.number}: {self.metric} {self.best.value:.4f} "
                         f"(MLflow run {self.best.run_id})")
            lines += [f"  {key} = {_short(value)}" for key, value in self.best.params.items()]
        lines += self._trials_table()
        lines += self.class_report
        if self.savings is not None:
            lines.append(self.savings.line())
        if self.interrupted:
            lines.append(f"interrupted: continue with `make sweep ... RESUME=1` (or run_sweep(..., resume=True, "
                         f"name={self.name!r}))")
        lines.append(f"open the tracking UI with `{UI_COMMAND}`, then {ui_link(UI_BASE, self.experiment_id, self.parent_run_id)}")
        return lines


def _absolute_paths(spec: SweepSpec) -> SweepSpec:
    """Trials run in their own working directories (maybe on other machines): make paths absolute."""
    base = json.loads(json.dumps(spec.base))
    config = spec.trial_config({})
    base.setdefault("data", {})["root"] = str(Path(config.data.root).expanduser().resolve())
    if config.model.checkpoint not in ("", RANDOM_WEIGHTS):
        base.setdefault("model", {})["checkpoint"] = str(Path(config.model.checkpoint).expanduser().resolve())
    base["tracking"] = {
        **base.get("tracking", {}),
        "mlflow_uri": absolute_uri(config.tracking.mlflow_uri),
        "artifact_root": str(Path(config.tracking.artifact_root).expanduser().resolve()),
        "optuna_storage": absolute_storage(config.tracking.optuna_storage),
    }
    return dataclasses.replace(spec, base=base)


def sweep_root() -> Path:
    """Where Ray Tune keeps sweeps: $AFFSEG_SWEEP_ROOT or runs/sweeps, absolute."""
    return Path(os.environ.get(SWEEP_ROOT_ENV) or SWEEP_ROOT).expanduser().resolve()


def _sweep_name(spec: SweepSpec, name: str | None, resume: bool, exists: Callable[[str], bool]) -> str:
    """`name`, else <space>-<profile>, numbered -2, -3, ... past sweeps that exist; with resume, the
    latest existing one."""
    root = sweep_root()
    stem = name or f"{spec.name}-{spec.profile}"
    if not NAME_PATTERN.fullmatch(stem):
        raise ConfigError(f"sweep name {stem!r}: use letters, digits, '-', '_' or '.'")
    if name is not None:
        if not resume and exists(name):
            raise ConfigError(f"sweep {name!r} already exists; resume it, or pick another name")
        latest, fresh = (name if exists(name) else None), name
    else:
        latest, fresh, number = None, stem, 1
        while exists(fresh):
            latest, number = fresh, number + 1
            fresh = f"{stem}-{number}"
    if not resume:
        return fresh
    if latest is None or not tune.Tuner.can_restore(str(root / latest)):
        raise ConfigError(f"no interrupted sweep {stem!r} under {root} to resume; start it without resume")
    return latest


def _store_spec(experiment: Path, spec: SweepSpec, overrides: list[str]) -> None:
    """Keep the sweep's settings beside Ray's state: a resumed sweep runs with exactly these."""
    experiment.mkdir(parents=True, exist_ok=True)
    (experiment / SPEC_FILE).write_bytes(pickle.dumps({"spec": spec, "overrides": overrides}))


def _stored_spec(experiment: Path, overrides: list[str]) -> SweepSpec:
    """The settings a sweep was started with; resuming with other overrides is refused."""
    path = experiment / SPEC_FILE
    if not path.is_file():
        raise ConfigError(f"{experiment}: no {SPEC_FILE}, not a sweep started by affseg; cannot resume it")
    stored = pickle.loads(path.read_bytes())
    if overrides and overrides != stored["overrides"]:
        raise ConfigError(f"resume continues sweep {experiment.name} as started, with overrides {stored['overrides']}; "
                          "drop the overrides or repeat them exactly")
    return stored["spec"]


def _start_ray() -> bool:
    """Connect to RAY_ADDRESS (a cluster) or start a local Ray; False when one was already running."""
    if ray.is_initialized():
        return False
    address = os.environ.get(RAY_ADDRESS_ENV)
    ray.init(address=address or None, include_dashboard=False, logging_level="WARNING",
             log_to_driver=False, configure_logging=True)
    return True


def _resources(spec: SweepSpec) -> tuple[dict[str, float], int]:
    """Per-trial resources and how many Ray trials (fused groups) run at once: one GPU each when the cluster
    has GPUs; without, `concurrency` trials, but one group at a time when trials are fused, holding the CPUs
    the parallel trials would have had (later groups are then pruned against earlier ones)."""
    gpus = int(ray.cluster_resources().get("GPU", 0))
    if gpus:
        return {"cpu": spec.cpus_per_trial, "gpu": 1}, gpus
    if spec.fuse > 1:
        return {"cpu": spec.cpus_per_trial * spec.concurrency}, 1
    return {"cpu": spec.cpus_per_trial}, spec.concurrency


def resource_shortfall(requested: dict[str, float], nodes: list[dict[str, float]], autoscaling: bool) -> str | None:
    """None when some node can hold a trial's `requested` resources ({"cpu": 4, "gpu": 1}); else the line to
    print while an autoscaling cluster adds nodes. On a fixed cluster a ConfigError naming the setting.

    `nodes` holds each alive node's resources ([{"CPU": 2.0, "GPU": 0.0}, ...]): Ray places a trial on one
    node, so the cluster's total would hide a trial that fits nowhere, and a trial needs all it asks for on
    the same node."""
    if any(all(need <= node.get(key.upper(), 0.0) for key, need in requested.items()) for node in nodes):
        return None
    most = {key: max((node.get(key.upper(), 0.0) for node in nodes), default=0.0) for key in requested}
    short = {key: need for key, need in requested.items() if need > most[key]} or dict(requested)
    wants = ", ".join(f"{need:g} {key.upper()}" for key, need in short.items())
    has = ", ".join(f"{most[key]:g} {key.upper()}" for key in short)
    if autoscaling:
        return f"a trial needs {wants} on one node but the nodes have at most {has}: waiting for the autoscaler"
    fix = f"cpus_per_trial={int(most.get('cpu', 0.0))}" if "cpu" in short else "a node with a GPU"
    raise ConfigError(f"a trial needs {wants} on one node but the Ray nodes have at most {has}, and the cluster "
                      f"does not autoscale; set {fix} (sweep setting) or add nodes")


def _alive_nodes() -> list[dict[str, float]]:
    """Resources of every alive Ray node."""
    return [node["Resources"] for node in ray.nodes() if node.get("Alive")]


def _autoscaling(started: bool) -> bool:
    """A Ray started here (local, fixed size) never grows; a cluster joined through RAY_ADDRESS (e.g. one
    launched from ray_cluster.yaml) is assumed to autoscale. Ray exposes no public "is autoscaling" flag."""
    return not started and bool(os.environ.get(RAY_ADDRESS_ENV))


def log_analysis(client, parent_run_id: str, study: optuna.Study) -> None:
    """The per-class heatmap and the importance table and heatmap on the parent run."""
    with tempfile.TemporaryDirectory() as tmp:
        for path in analysis.write_artifacts(study, Path(tmp)):
            retrying(client.log_artifact, parent_run_id, str(path))


def _savings(grid: tune.ResultGrid, study: optuna.Study, total: int, resources: dict[str, float]) -> Savings:
    runs = [RayTrial(tuple(m["optuna_trial"] for m in members_of(r.config)), float((r.metrics or {}).get(TIME_KEY, 0.0)))
            for r in grid if r.config]
    gpu = resources.get("gpu", 0)
    return sweep_savings(study.get_trials(deepcopy=False), runs, total, gpu or resources["cpu"], "GPU" if gpu else "CPU")


def ray_trials(spec: SweepSpec) -> int:
    """Ray Tune trials of the sweep: one per trial, or one per fused group of `spec.fuse` (the last may be smaller)."""
    return -(-spec.trials // spec.fuse)


def _records(study: optuna.Study, runs: dict[int, object]) -> list[TrialRecord]:
    """Optuna's view of every trial (a pruned trial's value is its last reported one) + its MLflow run."""
    return [
        TrialRecord(t.number, STATE_NAMES[t.state], t.value, dict(t.params),
                    runs[t.number].info.run_id if t.number in runs else None,
                    {k: v for k, v in t.user_attrs.items() if k.startswith(PSEUDO_PREFIX)})
        for t in study.get_trials(deepcopy=False)
    ]


def _best(records: list[TrialRecord], mode: str) -> TrialRecord | None:
    done = [r for r in records if r.state == "completed" and r.value is not None]
    if not done:
        return None
    return (max if mode == "max" else min)(done, key=lambda r: r.value)


def _per_class(grid: tune.ResultGrid, best: TrialRecord | None, metric: str, mode: str) -> pd.DataFrame | None:
    """The best trial's per-class IoU at its best validation, from its reported results."""
    if best is None:
        return None
    for result in grid:
        numbers = [m["optuna_trial"] for m in members_of(result.config)] if result.config else []
        if best.number in numbers and result.metrics_dataframe is not None:
            prefix = member_key(best.number, "") if "members" in result.config else ""
            column = prefix + metric
            if column not in result.metrics_dataframe:
                return None
            frame = result.metrics_dataframe.dropna(subset=[column])
            if frame.empty:
                return None
            row = frame.loc[frame[column].idxmax() if mode == "max" else frame[column].idxmin()]
            iou = prefix + "iou/"
            ious = {c[len(iou):]: row[c] for c in frame.columns if c.startswith(iou)}
            return pd.DataFrame({"class": list(ious), "iou": list(ious.values())}).dropna().reset_index(drop=True)
    return None


def run_sweep(space: str, profile: str = "demo", resume: bool = False, overrides: Iterable[str] = (),
              name: str | None = None, train_fn: Callable | None = None) -> SweepSummary:
    """Run (or with `resume`, continue) the sweep of `sweeps/<space>.yaml` under `sweeps/profiles/<profile>.yaml`.

    `overrides` are `key=value` strings: config keys (`train.iterations=60`) or sweep settings (`trials=4`,
    `pruner.n_startup_trials=1`). `train_fn` replaces `affseg.train.train` (same signature and callbacks).
    """
    overrides = list(overrides)
    spec = _absolute_paths(load_space(space, profile, overrides))
    base = spec.trial_config({})
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    client, experiment_id = open_experiment(base.tracking)
    studies = set(optuna.get_all_study_names(open_storage(base.tracking.optuna_storage)))

    def exists(candidate: str) -> bool:
        return ((sweep_root() / candidate).exists() or candidate in studies
                or sweep_exists(client, experiment_id, candidate))

    sweep = _sweep_name(spec, name, resume, exists)
    experiment = sweep_root() / sweep
    if resume:
        spec = _stored_spec(experiment, overrides)
        base = spec.trial_config({})
    ensure_dataset(base)  # once, before parallel trials race to build the demo set
    if not Path(base.data.root).is_dir():
        raise ConfigError(f"data.root: {base.data.root} is not a folder; point it at VOCdevkit/VOC2012 "
                          "(VOC_ROOT=... for the voc profile)")
    if not resume:
        _store_spec(experiment, spec, overrides)
    settings = {"space": spec.name, "profile": spec.profile, "metric": spec.metric, "mode": spec.mode,
                "trials": spec.trials, "pruner": spec.pruner.type, "seed": spec.seed, "fuse": spec.fuse}
    parent = parent_run(client, experiment_id, sweep, [spec.path, PROFILES_DIR / f"{spec.profile}.yaml"], settings)
    tracking = TrackingRef(tracking_uri(base.tracking), experiment_id, sweep, parent)
    study_ref = StudyRef(base.tracking.optuna_storage, sweep, spec.pruner)
    create_study(spec, study_ref)  # before any trial opens it
    context = TrialContext(spec, study_ref, tracking, train_fn)

    for key, value in RAY_DRIVER_ENV.items():
        os.environ.setdefault(key, value)
    started = _start_ray()
    try:
        resources, concurrency = _resources(spec)
        waiting = resource_shortfall(resources, _alive_nodes(), _autoscaling(started))
        if waiting:
            print(waiting, flush=True)
        trainable = tune.with_resources(tune.with_parameters(run_trial, context=context), resources)
        grouping = f" in fused groups of {spec.fuse}" if spec.fuse > 1 else ""
        print(f"sweep {sweep}: space {spec.path.name}, profile {spec.profile}, {spec.trials} trials{grouping}, "
              f"{concurrency} at a time on {resources}{' (resumed)' if resume else ''}", flush=True)
        if resume:
            tuner = tune.Tuner.restore(str(experiment), trainable, resume_unfinished=True)
        else:
            tuner = tune.Tuner(
                trainable,
                tune_config=tune.TuneConfig(
                    search_alg=OptunaBridge(spec, study_ref), metric=OBJECTIVE_KEY, mode=spec.mode,
                    num_samples=ray_trials(spec), max_concurrent_trials=concurrency, reuse_actors=True,
                    trial_dirname_creator=trial_dirname,
                ),
                run_config=tune.RunConfig(
                    name=sweep, storage_path=str(sweep_root()), verbose=0,
                    callbacks=[ProgressPrinter(spec.metric)],
                    failure_config=tune.FailureConfig(max_failures=spec.max_failures),
                    checkpoint_config=tune.CheckpointConfig(num_to_keep=CHECKPOINTS_KEPT),
                ),
            )
        grid = tuner.fit()
    finally:
        if started:
            ray.shutdown()

    study = optuna.load_study(study_name=sweep, storage=open_storage(study_ref.storage))
    records = _records(study, child_runs(client, experiment_id, sweep))
    sync_states(client, records)
    best = _best(records, spec.mode)
    interrupted = len(grid) < ray_trials(spec) or any(r.state == "running" for r in records)
    savings = _savings(grid, study, base.train.iterations, resources)
    log_savings(client, parent, savings)
    log_analysis(client, parent, study)
    finish_parent(client, tracking, records, spec.metric, best, "interrupted" if interrupted else "completed")
    summary = SweepSummary(sweep, experiment, parent, experiment_id, spec.metric, records, best,
                           _per_class(grid, best, spec.metric, spec.mode), interrupted, savings,
                           analysis.report_lines(study))
    retrying(client.set_tag, parent, NOTE_TAG, summary.description())
    print("\n".join(summary.lines()), flush=True)
    return summary
