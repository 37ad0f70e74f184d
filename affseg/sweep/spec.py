"""What a sweep is, as data: the validated `SweepSpec`, its `Parameter`s (each samples itself from an Optuna
trial, define-by-run), `Condition`s and `PrunerSpec`, and the names a space file may use.

Read and validated from YAML by `affseg.sweep.space.load_space` (checks in `affseg.sweep.space_checks`).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from affseg.config import Config, from_dict, set_path

PARAM_KINDS = ("uniform", "loguniform", "int", "categorical")
PARAM_FIELDS = ("type", "low", "high", "step", "choices")
PRUNER_TYPES = ("median", "successive_halving", "hyperband")
MODES = ("max", "min")
METRICS = ("val/miou", "val/pixel_acc", "val/mean_acc", "pseudo/cam", "pseudo/cam_par", "pseudo/refined")
CONFIG_SECTIONS = tuple(f.name for f in dataclasses.fields(Config))

SETTING_KEYS = ("metric", "mode", "trials", "concurrency", "max_failures", "cpus_per_trial", "pruner", "sampler",
                "fuse")
SPACE_KEYS = ("include", "parameters", "conditions", "base", *SETTING_KEYS)
PROFILE_KEYS = ("config", "base", "parameters", *SETTING_KEYS)


@dataclass(frozen=True)
class PrunerSpec:
    """An Optuna pruner; steps are training iterations (the validation's `iteration`)."""

    type: str = "median"
    n_startup_trials: int | None = None  # trials that must complete before any pruning (None: 2 for median, 0 else)
    n_warmup_steps: int = 0  # median: no pruning at or before this iteration
    min_resource: int | str = "auto"  # successive halving / hyperband: iterations of the first rung, or "auto"
    reduction_factor: int = 3  # successive halving / hyperband: keep the top 1/reduction_factor per rung
    signal: str = ""  # the metric the pruner reads at each validation; "" = the sweep's objective metric


@dataclass(frozen=True)
class Condition:
    """Active when the categorical parameter `key` took one of `values`."""

    key: str
    values: tuple


@dataclass(frozen=True)
class Parameter:
    """One swept config key and its distribution."""

    key: str  # dotted Config key, e.g. refine.alpha
    kind: str  # one of PARAM_KINDS
    low: float | int | None = None
    high: float | int | None = None
    step: float | int | None = None
    choices: tuple = ()
    when: Condition | None = None

    def suggest(self, trial) -> Any:
        """Ask an Optuna trial for this parameter's value."""
        if self.kind == "categorical":
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.key, self.low, self.high, step=self.step or 1)
        return trial.suggest_float(self.key, self.low, self.high, step=self.step, log=self.kind == "loguniform")


@dataclass(frozen=True)
class SweepSpec:
    """A validated sweep: what to sample, the base config, the objective and the budget."""

    name: str  # the space's file stem, e.g. refine
    profile: str  # the profile's file stem, e.g. demo
    path: Path
    parameters: tuple[Parameter, ...]  # unconditional ones first
    base: dict = field(repr=False)  # merged config mapping every trial starts from
    metric: str  # one of METRICS, reported at every validation
    mode: str  # max | min
    trials: int  # the trial budget
    concurrency: int  # parallel trials (groups when fuse > 1) when no GPU is visible (with GPUs: one per GPU)
    max_failures: int  # restarts of a trial from its last checkpoint when its worker dies or it raises
    cpus_per_trial: int
    pruner: PrunerSpec
    seed: int  # the TPE sampler's seed
    fuse: int = 1  # trials trained together on one teacher pass (SPEC §5.4); 1 = every trial alone

    def sample(self, trial) -> dict[str, Any]:
        """Define-by-run: ask `trial` for every parameter whose condition holds; returns {key: value}."""
        values: dict[str, Any] = {}
        for parameter in self.parameters:
            if parameter.when is None or values.get(parameter.when.key) in parameter.when.values:
                values[parameter.key] = parameter.suggest(trial)
        return values

    def trial_config(self, params: dict[str, Any], overrides: dict[str, Any] | None = None) -> Config:
        """The base configuration with `params` (dotted keys) and then `overrides` (dotted keys) set."""
        values = copy.deepcopy(self.base)
        for key, value in {**params, **(overrides or {})}.items():
            set_path(values, key.split("."), value)
        return from_dict(values)
