"""The sweep platform: search spaces as data, Ray Tune + Optuna search with pruning, MLflow tracking, promotion.

Modules, one job each:
  space.py     sweeps/<space>.yaml + sweeps/profiles/<profile>.yaml → a validated `SweepSpec` (reading, layering)
  spec.py      the `SweepSpec`, its `Parameter`s (define-by-run sampling), `PrunerSpec`, the allowed names
  space_checks.py  validation of a space or profile file's raw values, one `ConfigError` line each
  pruning.py   the Optuna ↔ Ray Tune bridge (ask/tell in the driver, report/should_prune in the trial)
  uris.py      tracking-store URIs as paths (no MLflow): `absolute_uri`
  tracking.py  MLflow: the store, one parent run per sweep, one child run per trial, run names, UI links
  trial_logging.py  what a trial logs into its child run (`MlflowCallback`)
  sweep_results.py  what the driver writes at the end: synced states, the parent's trials table and curves
  trial.py     the trial side: the Ray Tune trainable `run_trial` and its `TuneReporter`
  groups.py    fused trials: one Ray trial trains K Optuna trials on one teacher pass
  tuner.py     the driver: `run_sweep`, the Ray Tune experiment
  report.py    what a sweep shows: progress lines, the `SweepSummary`, the savings and per-class view
  savings.py   trial-iterations, device-seconds and teacher passes saved by pruning and fusing
  analysis.py  per-class IoU of the top trials and per-class fANOVA importance (`affseg report`)
  promote.py   best trial → registered pyfunc model `affseg` with alias `champion`
  pyfunc_model.py  the promoted model's code (MLflow models-from-code)

Importing this package loads nothing heavy; Ray and MLflow are imported by the modules that need them.
"""
