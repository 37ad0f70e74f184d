"""Checks made before the first trial: resources (issue 9, item 18) and where trials write (item 13)."""

from __future__ import annotations

import pytest

from test_pruning import synthetic_train

from affseg.config import ConfigError
from affseg.sweep.tuner import resource_shortfall


def test_trial_that_fits_needs_nothing():
    assert resource_shortfall({"cpu": 2}, [{"CPU": 2.0}], autoscaling=False) is None


def test_fixed_cluster_too_small_names_the_setting():
    with pytest.raises(ConfigError, match=r"cpus_per_trial=2") as err:
        resource_shortfall({"cpu": 4}, [{"CPU": 2.0}, {"CPU": 1.0}], autoscaling=False)
    assert "\n" not in str(err.value)


def test_missing_gpu_on_fixed_cluster():
    with pytest.raises(ConfigError, match="GPU"):
        resource_shortfall({"cpu": 1, "gpu": 1}, [{"CPU": 8.0}], autoscaling=False)


def test_a_fitting_node_anywhere_is_enough():
    # the multi-node GPU case: a CPU-only head listed first must not hide the GPU workers (was flaky)
    nodes = [{"CPU": 1.0, "GPU": 0.0}, {"CPU": 1.0, "GPU": 1.0}]
    assert resource_shortfall({"cpu": 1, "gpu": 1}, nodes, autoscaling=False) is None


def test_resources_must_be_on_one_node():
    nodes = [{"CPU": 4.0, "GPU": 0.0}, {"CPU": 1.0, "GPU": 1.0}]
    with pytest.raises(ConfigError, match="on one node"):
        resource_shortfall({"cpu": 4, "gpu": 1}, nodes, autoscaling=False)


def test_autoscaling_cluster_waits_with_one_line():
    line = resource_shortfall({"cpu": 4}, [{"CPU": 2.0}], autoscaling=True)
    assert "waiting" in line and "4 CPU" in line and "\n" not in line


def test_impossible_cpus_per_trial_stops_the_real_sweep(tmp_path):
    from sweep_helpers import run_isolated_sweep
    from test_pruning import SYNTHETIC_OVERRIDES, SYNTHETIC_SPACE, synthetic_train

    space = tmp_path / "space.yaml"
    space.write_text(SYNTHETIC_SPACE)
    with pytest.raises(ConfigError, match="cpus_per_trial=2"):
        run_isolated_sweep(tmp_path, str(space), "demo", overrides=[*SYNTHETIC_OVERRIDES, "cpus_per_trial=64"],
                           train_fn=synthetic_train)


def train_outside_synced_folder(config, callbacks=(), resume_from=None):
    """`synthetic_train`, failing the trial when train.out_dir lies in the folder Ray re-uploads."""
    from pathlib import Path

    from ray import tune

    synced = Path(tune.get_context().get_storage().experiment_driver_staging_path)
    if Path(config.train.out_dir).is_relative_to(synced):
        raise RuntimeError(f"train.out_dir {config.train.out_dir} is inside Ray's synced {synced}")
    return synthetic_train(config, callbacks, resume_from)


def test_trials_write_outside_the_folder_ray_syncs(tmp_path):
    from sweep_helpers import run_isolated_sweep
    from test_pruning import SYNTHETIC_OVERRIDES, SYNTHETIC_SPACE

    space = tmp_path / "space.yaml"
    space.write_text(SYNTHETIC_SPACE)
    summary = run_isolated_sweep(tmp_path, str(space), "demo", overrides=[*SYNTHETIC_OVERRIDES, "trials=1"],
                                 train_fn=train_outside_synced_folder)
    assert summary.counts()["failed"] == 0 and summary.counts()["completed"] + summary.counts()["pruned"] == 1


import sys  # noqa: E402

import ray  # noqa: E402

# Ray workers unpickle this module's functions by value: tests/ is not on their sys.path.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
