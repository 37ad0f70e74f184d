"""Running a sweep in isolation from the developer's environment (shared by the sweep tests)."""

from pathlib import Path

import pytest


def run_isolated_sweep(work: Path, *args, **kwargs):
    """`run_sweep(*args, **kwargs)` with `work` as working directory (so mlflow/ and runs/ land there),
    no MLFLOW_TRACKING_URI / RAY_ADDRESS from the environment, and a fresh 2-CPU local Ray."""
    import ray

    from affseg.sweep.tuner import run_sweep

    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(work)
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        patch.delenv("RAY_ADDRESS", raising=False)
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            return run_sweep(*args, **kwargs)
        finally:
            ray.shutdown()
