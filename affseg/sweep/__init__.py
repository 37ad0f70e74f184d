"""The sweep platform: search spaces as data, Ray Tune + Optuna search with pruning, MLflow tracking, promotion.

Modules, one job each:
  space.py     sweeps/<space>.yaml + sweeps/profiles/<profile>.yaml → a validated `SweepSpec`
  pruning.py   the Optuna ↔ Ray Tune bridge (ask/tell in the driver, report/should_prune in the trial)
  tracking.py  MLflow: one parent run per sweep, one child run per trial (`MlflowCallback`), run names, UI links
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
