"""Training loop on the tiny encoder (random weights) and the small demo set."""

import shutil

import pytest
import torch

from affseg.callbacks import Callback
from affseg.config import OptimConfig, load_config
from affseg.model import UniClAffSeg
from affseg.train import LAST_CHECKPOINT, TrainingError, load_checkpoint, lr_factor, train


def tiny_config(root, out, *extra):
    return load_config(None, [
        f"data.root={root}", "data.demo=false", "data.pseudo_subset=2", "data.val_limit=2",
        "model.encoder=unicl_swin_tiny", "model.checkpoint=random", "model.decoder_dim=32",
        "model.decoder_mlp_dim=32", "model.decoder_layers=1", "model.decoder_heads=2",
        "data.crop_size=96", "train.batch_size=2", "train.accumulation=2", "train.iterations=4",
        "train.val_interval=2", "train.log_interval=1", "optim.warmup_iters=1", "optim.lr=1e-3",
        f"train.out_dir={out}", *extra,
    ])


class Record(Callback):
    def __init__(self, copy_at=None, copy_to=None):
        self.losses, self.validations, self.copy_at, self.copy_to = {}, [], copy_at, copy_to

    def on_log(self, iteration, values):
        self.losses[iteration] = values["loss"]

    def on_validation(self, result, checkpoint, is_best):
        self.validations.append(result.iteration)
        if result.iteration == self.copy_at:
            shutil.copy(checkpoint, self.copy_to)


def test_lr_schedule_warmup_then_poly():
    cfg = OptimConfig(warmup_iters=10, warmup_ratio=0.1, poly_power=1.0)
    assert lr_factor(0, 100, cfg) == pytest.approx(0.1)
    assert lr_factor(5, 100, cfg) == pytest.approx((1 - 0.05) * (0.1 + 0.9 * 0.5))
    assert lr_factor(10, 100, cfg) == pytest.approx(0.9)
    assert lr_factor(100, 100, cfg) == 0.0


def test_resume_equals_uninterrupted_run(small_demo, tmp_path):
    full = Record(copy_at=2, copy_to=tmp_path / "at2.pt")
    result = train(tiny_config(small_demo, tmp_path / "a"), [full])
    assert result.iterations_done == 4 and full.validations == [2, 4]
    assert (tmp_path / "a" / LAST_CHECKPOINT).is_file() and result.best_checkpoint.is_file()
    resumed = Record()
    again = train(tiny_config(small_demo, tmp_path / "b"), [resumed], resume_from=tmp_path / "at2.pt")
    assert sorted(resumed.losses) == [3, 4]
    for iteration in (3, 4):
        assert resumed.losses[iteration] == pytest.approx(full.losses[iteration], rel=1e-6, abs=1e-7)
    assert load_checkpoint(tmp_path / "b" / LAST_CHECKPOINT)["iteration"] == 4
    assert again.best.miou == pytest.approx(result.best.miou)


def test_nonfinite_loss_is_skipped_and_counted(small_demo, tmp_path, monkeypatch):
    original = UniClAffSeg.losses
    calls = {"n": 0}

    def poisoned(self, output):
        losses = original(self, output)
        calls["n"] += 1
        if calls["n"] == 1:  # first micro-batch of iteration 1
            losses["loss"] = losses["loss"] * float("nan")
        return losses

    monkeypatch.setattr(UniClAffSeg, "losses", poisoned)
    record = Record()
    result = train(tiny_config(small_demo, tmp_path / "n", "train.iterations=2"), [record])
    assert result.iterations_done == 2
    assert load_checkpoint(tmp_path / "n" / LAST_CHECKPOINT)["nonfinite"] == 1
    assert 1 not in record.losses and 2 in record.losses  # the skipped step logged nothing

    calls["n"] = 0
    with pytest.raises(TrainingError, match=r"1 non-finite losses \(train.max_nonfinite=0\)"):
        train(tiny_config(small_demo, tmp_path / "m", "train.max_nonfinite=0"), [])


def test_callback_can_stop_training(small_demo, tmp_path):
    class StopAfterFirst(Callback):
        def should_stop(self):
            return True

    result = train(tiny_config(small_demo, tmp_path / "s"), [StopAfterFirst()])
    assert result.stopped_early and result.iterations_done == 2


def test_wrong_checkpoint_is_one_line(tmp_path, small_demo):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"nope")
    with pytest.raises(TrainingError, match="bad.pt: unreadable checkpoint"):
        train(tiny_config(small_demo, tmp_path / "x"), [], resume_from=bad)
    torch.save({"format": 99}, tmp_path / "other.pt")
    with pytest.raises(TrainingError, match="not an affseg training checkpoint"):
        train(tiny_config(small_demo, tmp_path / "y"), [], resume_from=tmp_path / "other.pt")
