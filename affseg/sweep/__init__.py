"""The sweep platform: search spaces as data, Ray Tune + Optuna search with pruning, MLflow tracking, promotion.

Modules, one job each:
  space.py     sweeps/<space>.yaml + sweeps/profiles/<profile>.yaml → a validated `SweepSpec`
  pruning.py   the Optuna ↔ Ray Tune bridge (ask/tell in the driver, report/should_prune in the trial)
  tracking.py  MLflow: one parent run per sweep, one child run per trial (`MlflowCallback`)
  tuner.py     `run_sweep`: the Ray Tune experiment, its trainable, progress lines and summary
  promote.py   best trial → registered pyfunc model `affseg` with alias `champion`

Importing this package loads nothing heavy; Ray and MLflow are imported by the modules that need them.
"""
