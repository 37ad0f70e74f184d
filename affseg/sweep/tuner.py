"""`run_sweep`: a Ray Tune experiment over a sweep space, searched by Optuna, tracked in MLflow.

Driver: load + validate the space (a bad file stops here), build the demo set once, open the MLflow
parent run and the Optuna study, then `Tuner.fit()` with `OptunaBridge` as searcher over the trainable
of `affseg.sweep.trial`. Ray's own console output is off; `affseg.sweep.report` prints one line per trial
event and the summary at the end.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import re
from collections.abc import Callable, Iterable
from pathlib import Path

import optuna
import ray
from ray import tune

from affseg.backbones.demo_weights import RANDOM_WEIGHTS
from affseg.config import ConfigError
from affseg.engine.trainer import ensure_dataset
from affseg.sweep import analysis
from affseg.sweep.pruning import OBJECTIVE_KEY, OptunaBridge, StudyRef, absolute_storage, create_study, open_storage
from affseg.sweep.report import (
    ProgressPrinter, SweepSummary, best_per_class, best_record, log_analysis, measure_savings, trial_dirname,
    trial_records,
)
from affseg.sweep.space import PROFILES_DIR, load_space
from affseg.sweep.spec import SweepSpec
from affseg.sweep.sweep_results import child_runs, finish_parent, log_savings, sync_states
from affseg.sweep.tracking import (
    TrackingRef, open_experiment, parent_run, retrying, sweep_exists, tracking_uri,
)
from affseg.sweep.uris import absolute_uri
from affseg.sweep.trial import TrialContext, run_trial

SWEEP_ROOT = "runs/sweeps"  # Ray Tune experiments, one folder per sweep (relative to the working dir)
SWEEP_ROOT_ENV = "AFFSEG_SWEEP_ROOT"  # overrides SWEEP_ROOT; on a cluster, a shared filesystem path
CHECKPOINTS_KEPT = 1  # Ray keeps only the latest trial checkpoint (each holds last.pt and best.pt)
SPEC_FILE = "affseg_sweep.pkl"  # in the sweep's Ray folder: the SweepSpec and overrides it was started with
# Driver-side Ray Tune settings (a user's own environment wins): our progress lines replace Ray's
# tables and trial tracebacks; the experiment snapshot is at most 2 s stale when the driver dies.
RAY_DRIVER_ENV = {
    "RAY_AIR_NEW_OUTPUT": "0", "TUNE_PRINT_ALL_TRIAL_ERRORS": "0", "TUNE_GLOBAL_CHECKPOINT_S": "2",
    "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",
}
RAY_ADDRESS_ENV = "RAY_ADDRESS"
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
NOTE_TAG = "mlflow.note.content"  # a run's description in the MLflow UI


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


def ray_trials(spec: SweepSpec) -> int:
    """Ray Tune trials of the sweep: one per trial, or one per fused group of `spec.fuse` (the last may be smaller)."""
    return -(-spec.trials // spec.fuse)


def run_sweep(space: str, profile: str = "demo", resume: bool = False, overrides: Iterable[str] = (),
              name: str | None = None, train_fn: Callable | None = None,
              fused_train_fn: Callable | None = None) -> SweepSummary:
    """Run (or with `resume`, continue) the sweep of `sweeps/<space>.yaml` under `sweeps/profiles/<profile>.yaml`.

    `overrides` are `key=value` strings: config keys (`train.iterations=60`) or sweep settings (`trials=4`,
    `pruner.n_startup_trials=1`). `train_fn` replaces `affseg.train.train` (same signature and callbacks),
    `fused_train_fn` replaces `affseg.train.train_fused` for fused groups (a list of `Member`s).
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
    context = TrialContext(spec, study_ref, tracking, train_fn, fused_train_fn)

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
    records = trial_records(study, child_runs(client, experiment_id, sweep), spec.metric)
    sync_states(client, records)
    best = best_record(records, spec.mode)
    interrupted = len(grid) < ray_trials(spec) or any(r.state == "running" for r in records)
    savings = measure_savings(grid, study, base.train.iterations, resources)
    log_savings(client, parent, savings)
    log_analysis(client, parent, study)
    finish_parent(client, tracking, records, spec.metric, best, "interrupted" if interrupted else "completed")
    summary = SweepSummary(sweep, experiment, parent, experiment_id, spec.metric, records, best,
                           best_per_class(grid, best, spec.metric, spec.mode), interrupted, savings,
                           analysis.report_lines(study))
    retrying(client.set_tag, parent, NOTE_TAG, summary.description())
    print("\n".join(summary.lines()), flush=True)
    return summary
