"""The Optuna ↔ Ray Tune bridge, with pruning (Ray's stock OptunaSearch drops it).

Who does what:
- Driver (`OptunaBridge`, a Ray Tune `Searcher`): `study.ask()` + define-by-run sampling of the space
  (conditional parameters only when active) in `suggest`; the single place that `tell`s a trial:
  COMPLETE with its objective, PRUNED when its last result says so, FAIL when it raised.
- Trial (`TrialLink`, in the trainable's process): after each validation `trial.report(value, step=iteration)`
  then `trial.should_prune()` against the same storage; the verdict goes back into training as
  `Callback.should_stop()` and into the reported result as `pruned`, so Ray ends the trial normally and
  the driver tells PRUNED — never FAIL or COMPLETE.

The study lives in `TrackingConfig.optuna_storage` (SQLite beside MLflow by default, any RDB URL, or
`journal:<file>` for a journal file on shared storage) and is opened with load_if_exists, so a resumed
sweep continues it.
"""

from __future__ import annotations

import logging
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import ray
from ray.tune.search import Searcher

from affseg.sweep.spec import PrunerSpec, SweepSpec
from affseg.sweep.uris import absolute_uri

# Tested against ray[tune]==2.60.0 (pinned in pyproject.toml): the Searcher hooks, Tuner.restore and
# ray.tune.report/get_checkpoint used here changed between minor releases before.
TESTED_RAY = (2, 60)
if tuple(int(part) for part in ray.__version__.split(".")[:2]) != TESTED_RAY:
    raise ImportError(
        f"affseg.sweep needs ray {TESTED_RAY[0]}.{TESTED_RAY[1]}.x (found {ray.__version__}); "
        "reinstall with `make setup` or update affseg/sweep/pruning.py after re-testing"
    )

log = logging.getLogger(__name__)

PRUNED_KEY = "pruned"  # in every reported result: 1.0 when the pruner ended the trial at this validation
OBJECTIVE_KEY = "objective"  # in every reported result: best value of the sweep metric so far
JOURNAL_PREFIX = "journal:"  # optuna_storage=journal:/shared/optuna.log → a journal file, not an RDB
SQLITE_LOCK_TIMEOUT_S = 60  # trials and driver share one SQLite file; wait for its lock this long
MEDIAN_STARTUP_TRIALS = 2  # Optuna's MedianPruner needs some finished curves for its median
DIRECTIONS = {"max": "maximize", "min": "minimize"}
FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)


def _journal_path(url: str) -> Path:
    path = url[len(JOURNAL_PREFIX):]
    return Path(path[2:] if path.startswith("//") else path)


def absolute_storage(url: str) -> str:
    """Relative SQLite or journal paths → absolute (trials run in other working directories)."""
    if url.startswith(JOURNAL_PREFIX):
        path = _journal_path(url).expanduser().resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        return f"{JOURNAL_PREFIX}{path}"
    return absolute_uri(url)


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """An RDB URL (sqlite:///..., postgresql://...) or `journal:<path>` → Optuna storage."""
    if url.startswith(JOURNAL_PREFIX):
        return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(_journal_path(url))))
    engine = {"connect_args": {"timeout": SQLITE_LOCK_TIMEOUT_S}} if url.startswith("sqlite") else None
    return optuna.storages.RDBStorage(url, engine_kwargs=engine)


class AfterStartup(optuna.pruners.BasePruner):
    """`pruner`, but no trial is pruned before `startup` trials of the study have completed: they give the
    pruner full curves to compare against and the per-class importance analysis its completed trials."""

    def __init__(self, pruner: optuna.pruners.BasePruner, startup: int):
        self.pruner = pruner
        self.startup = startup

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        verdict = self.pruner.prune(study, trial)  # always asked: successive halving records the rung values here
        completed = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        return verdict and len(completed) >= self.startup


def build_pruner(spec: PrunerSpec, max_resource: int | str = "auto") -> optuna.pruners.BasePruner:
    """The Optuna pruner of `spec`; `max_resource` (hyperband): the iterations of a full trial."""
    if spec.type == "median":
        startup = MEDIAN_STARTUP_TRIALS if spec.n_startup_trials is None else spec.n_startup_trials
        return optuna.pruners.MedianPruner(n_startup_trials=startup, n_warmup_steps=spec.n_warmup_steps)
    if spec.type == "hyperband":
        pruner = optuna.pruners.HyperbandPruner(min_resource=1 if spec.min_resource == "auto" else spec.min_resource,
                                                max_resource=max_resource, reduction_factor=spec.reduction_factor)
    else:
        pruner = optuna.pruners.SuccessiveHalvingPruner(min_resource=spec.min_resource,
                                                        reduction_factor=spec.reduction_factor)
    # Wrapped, a HyperbandPruner is no longer recognised by TPE, which then samples from all brackets' trials.
    return AfterStartup(pruner, spec.n_startup_trials) if spec.n_startup_trials else pruner


@dataclass(frozen=True)
class StudyRef:
    """Everything a process needs to open the sweep's study (picklable, sent to every trial)."""

    storage: str
    name: str
    pruner: PrunerSpec


def create_study(spec: SweepSpec, ref: StudyRef) -> optuna.Study:
    """Create the sweep's study, or load it when it exists (resume). A resumed study's sampler is seeded
    past the trials it already has, so it does not replay the first driver's random draws."""
    study = optuna.create_study(
        storage=open_storage(ref.storage), study_name=ref.name, direction=DIRECTIONS[spec.mode],
        sampler=build_sampler(spec.seed), pruner=build_pruner(spec.pruner), load_if_exists=True,
    )
    done = len(study.get_trials(deepcopy=False))
    if done:
        study.sampler = build_sampler(spec.seed + done)
    return study


def build_sampler(seed: int) -> optuna.samplers.TPESampler:
    """Seeded TPE; with trials running in parallel, their pending points count as bad ones (constant
    liar), so parallel asks do not all land on the same spot. Sequential sweeps are unaffected."""
    return optuna.samplers.TPESampler(seed=seed, constant_liar=True)


class TrialLink:
    """The trial side: report intermediate values of Optuna trial `number` and ask the pruner."""

    def __init__(self, ref: StudyRef, number: int):
        self.storage = open_storage(ref.storage)
        # The sampler is never asked here; a random one skips building TPE state.
        self.study = optuna.load_study(study_name=ref.name, storage=self.storage, pruner=build_pruner(ref.pruner),
                                       sampler=optuna.samplers.RandomSampler())
        study_id = self.storage.get_study_id_from_name(ref.name)
        self.trial_id = self.storage.get_trial_id_from_study_id_trial_number(study_id, number)
        self.number = number
        self.signal = ref.pruner.signal  # the metric reported to the pruner ("" = the sweep's objective)

    def finished(self) -> bool:
        """True when the driver already told this trial's outcome (a restored sweep re-queued it)."""
        return self.storage.get_trial(self.trial_id).state in FINISHED

    def record_best(self, values: dict[str, float]) -> None:
        """Store the trial's best validation so far (the sweep metric, `iou/<class>`, `pseudo/<kind>`) as Optuna
        user attributes: the summary and the per-class importance analysis (`affseg.sweep.analysis`) read them."""
        for key, value in values.items():
            self.storage.set_trial_user_attr(self.trial_id, key, float(value))

    def should_prune(self, step: int, value: float) -> bool:
        """Report `value` at training iteration `step`; the pruner's verdict."""
        trial = optuna.trial.Trial(self.study, self.trial_id)
        trial.report(value, step=step)
        return trial.should_prune()


def member_key(number: int, key: str) -> str:
    """A fused group reports each member's metrics under `<optuna number>/<key>`."""
    return f"{number}/{key}"


class OptunaBridge(Searcher):
    """Ray Tune searcher: asks Optuna for each trial's parameters and tells it every outcome.

    A suggested config is `{"params": {dotted key: value}, "optuna_trial": number}`; with `spec.fuse` > 1 it
    is a group `{"members": [such configs]}` (one Ray trial training them on one teacher pass, SPEC §5.4),
    whose results carry each member's keys as `member_key(number, key)`: a member is told PRUNED as soon as
    its result says so, the others when the group ends. The study is opened lazily (the searcher is
    pickled into Ray's experiment state); `save`/`restore` keep the Ray trial id → Optuna number map, so a
    restored sweep tells the right trials. Optuna trials left RUNNING by a killed driver that Ray never
    recorded are told FAIL when the study is next opened.
    """

    def __init__(self, spec: SweepSpec, ref: StudyRef):
        super().__init__(metric=OBJECTIVE_KEY, mode=spec.mode)
        self.spec, self.ref = spec, ref
        self.numbers: dict[str, int] = {}  # Ray trial id → Optuna trial number (fuse = 1)
        self.groups: dict[str, list[int]] = {}  # Ray trial id → its members' Optuna numbers (fuse > 1)
        self.objectives: dict[int, float] = {}  # a group member's running best, from its latest result
        self.asked = 0  # Optuna trials asked so far: the budget is spec.trials, groups may end smaller
        self._study: optuna.Study | None = None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_study"] = None
        return state

    @property
    def study(self) -> optuna.Study:
        if self._study is None:
            self._study = create_study(self.spec, self.ref)
            self._fail_orphans()
        return self._study

    def _fail_orphans(self) -> None:
        known = set(self.numbers.values()) | {n for group in self.groups.values() for n in group}
        for trial in self._study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            if trial.number not in known:
                log.warning("optuna trial %d was started by a driver that died before Ray recorded it: FAIL",
                            trial.number)
                self._study.tell(trial.number, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec) -> bool:
        return True  # the space comes from the SweepSpec; Tune's param_space carries no distributions

    def _ask(self) -> dict[str, Any]:
        trial = self.study.ask()
        self.asked += 1
        return {"params": self.spec.sample(trial), "optuna_trial": trial.number}

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        if self.spec.fuse == 1:
            config = self._ask()
            self.numbers[trial_id] = config["optuna_trial"]
            return config
        size = min(self.spec.fuse, self.spec.trials - self.asked)
        if size < 1:
            return Searcher.FINISHED
        members = [self._ask() for _ in range(size)]
        self.groups[trial_id] = [member["optuna_trial"] for member in members]
        return {"members": members}

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        states = optuna.trial.TrialState
        for number in self.groups.get(trial_id, ()):
            if member_key(number, OBJECTIVE_KEY) in result:
                self.objectives[number] = float(result[member_key(number, OBJECTIVE_KEY)])
            if result.get(member_key(number, PRUNED_KEY)):
                self.study.tell(number, state=states.PRUNED, skip_if_finished=True)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self.groups:
            self._complete_group(trial_id, result or {}, error)
            return
        number = self.numbers.get(trial_id)
        if number is None:
            return
        states = optuna.trial.TrialState
        if error:
            self.study.tell(number, state=states.FAIL, skip_if_finished=True)
        elif result and result.get(PRUNED_KEY):
            self.study.tell(number, state=states.PRUNED, skip_if_finished=True)
        elif result and result.get(OBJECTIVE_KEY) is not None:
            self.study.tell(number, float(result[OBJECTIVE_KEY]), skip_if_finished=True)
        else:  # ended without a single validation
            self.study.tell(number, state=states.FAIL, skip_if_finished=True)

    def _complete_group(self, trial_id: str, result: dict, error: bool) -> None:
        """Members still running when the group ended: FAIL on error, else their running best (COMPLETE)."""
        self.on_trial_result(trial_id, result)
        states = optuna.trial.TrialState
        for number in self.groups[trial_id]:
            if error or number not in self.objectives:
                self.study.tell(number, state=states.FAIL, skip_if_finished=True)
            else:
                self.study.tell(number, self.objectives[number], skip_if_finished=True)

    def get_state(self) -> dict:
        return {"numbers": dict(self.numbers), "groups": dict(self.groups), "objectives": dict(self.objectives),
                "asked": self.asked}

    def set_state(self, state: dict) -> None:
        self.numbers = dict(state["numbers"])
        self.groups = {key: list(value) for key, value in state.get("groups", {}).items()}
        self.objectives = dict(state.get("objectives", {}))
        self.asked = int(state.get("asked", len(self.numbers)))

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as file:
            pickle.dump(self.get_state(), file)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as file:
            self.set_state(pickle.load(file))
