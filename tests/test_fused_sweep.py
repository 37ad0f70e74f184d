"""A sweep with FUSE=3 (SPEC §5.4): one Ray trial trains three Optuna trials on one teacher pass; each member
is a full trial (Optuna state, MLflow child run with its metrics) whose metrics equal the same configuration
trained alone, and a space that sweeps a non-fusable key stops before any trial."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
from one_head_reference import _Recorder
from sweep_helpers import run_isolated_sweep

from affseg.config import ConfigError
from affseg.sweep.space import load_space

TESTS = Path(__file__).resolve().parent
DEMO_ENCODER = TESTS.parent / "affseg" / "assets" / "unicl_swin_tiny_demo.pth"
FUSED_OVERRIDES = ["train.iterations=8", "train.val_interval=4", "train.log_interval=2", "train.batch_size=2",
                   "data.val_limit=4", "data.pseudo_subset=4", "trials=3", "fuse=3"]
TOLERANCE = 1e-6  # same batches and teacher outputs as alone (see tests/test_fused.py)


def test_a_space_sweeping_a_non_fusable_key_stops_before_any_trial():
    with pytest.raises(ConfigError, match=r"parameters.model.decoder_stages cannot be fused"):
        load_space("stages", "demo", ["fuse=2"])


@pytest.mark.slow
def test_fused_sweep_members_are_trials_equal_to_training_alone(small_demo, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    from affseg.train import train

    encoder = tmp_path / "encoder.pth"
    shutil.copy(DEMO_ENCODER, encoder)
    overrides = [f"data.root={small_demo}", f"model.checkpoint={encoder}", *FUSED_OVERRIDES]
    summary = run_isolated_sweep(tmp_path, "refine", "demo", overrides=overrides)
    output = capsys.readouterr().out
    assert "in fused groups of 3" in output
    assert len(summary.trials) == 3 and all(r.state in ("completed", "pruned") for r in summary.trials)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow/mlflow.db")
    spec = load_space("refine", "demo", overrides)
    for record in summary.trials:
        assert f"trial {record.number:>3}" in output  # progress lines name members, not groups
        run = client.get_run(record.run_id)
        assert run.data.tags["state"] == record.state
        history = [(m.step, m.value) for m in client.get_metric_history(record.run_id, "val/miou")]
        alone = _Recorder()
        train(spec.trial_config(record.params, {"train.out_dir": str(tmp_path / f"alone{record.number}")}), [alone])
        expected = [(v["iteration"], v["val/miou"]) for v in alone.validations][: len(history)]
        assert [step for step, _ in history] == [step for step, _ in expected]
        assert all(math.isclose(a, b, abs_tol=TOLERANCE) for (_, a), (_, b) in zip(history, expected))
