"""Training loop on the tiny encoder (random weights) and the small demo set."""

import shutil

import pytest
import torch

from affseg.callbacks import Callback
from affseg.config import ConfigError, OptimConfig, load_config
from affseg.data.sampling import DrawDataset
import affseg.engine.head
from affseg.engine.checkpoint import (BEST_CHECKPOINT, LAST_CHECKPOINT, TrainingError, load_checkpoint,
                                      nonfinite_entry, require_finite)
from affseg.engine.schedule import lr_factor
from affseg.engine.trainer import Trainer
from affseg.losses import method_losses
from affseg.train import train


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
    calls = {"n": 0}

    def poisoned(*args):
        losses = method_losses(*args)
        calls["n"] += 1
        if calls["n"] == 1:  # first micro-batch of iteration 1
            losses["loss"] = losses["loss"] * float("nan")
        return losses

    monkeypatch.setattr(affseg.engine.head, "method_losses", poisoned)
    record = Record()
    result = train(tiny_config(small_demo, tmp_path / "n", "train.iterations=2"), [record])
    assert result.iterations_done == 2
    assert load_checkpoint(tmp_path / "n" / LAST_CHECKPOINT)["nonfinite"] == 1
    assert 1 not in record.losses and 2 in record.losses  # the skipped step logged nothing

    calls["n"] = 0
    with pytest.raises(TrainingError, match=r"1 non-finite losses or updates \(train.max_nonfinite=0\)"):
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


def finite_checkpoint(path):
    """True when every floating tensor of a checkpoint's decoder, optimiser and scaler is finite."""
    state = load_checkpoint(path)
    return nonfinite_entry({k: state[k] for k in ("decoder", "optimiser", "scaler")}) is None


def test_diverged_run_stops_and_never_checkpoints_nan(small_demo, tmp_path):
    """optim.lr=1e6: on the tiny model the loss itself turns non-finite (counted, skipped); the
    finite-loss / NaN-update path is `test_nonfinite_update_is_rolled_back_and_counted`."""
    out = tmp_path / "d"
    result = train(tiny_config(small_demo, out, "optim.lr=1e6", "train.max_nonfinite=100"), [])
    state = load_checkpoint(out / LAST_CHECKPOINT)
    assert result.iterations_done == 4 and state["nonfinite"] >= 1
    assert finite_checkpoint(out / LAST_CHECKPOINT) and finite_checkpoint(out / BEST_CHECKPOINT)
    with pytest.raises(TrainingError, match=r"non-finite losses or updates \(train.max_nonfinite=0\)"):
        train(tiny_config(small_demo, tmp_path / "e", "optim.lr=1e6", "train.max_nonfinite=0"), [])


def test_nonfinite_update_is_rolled_back_and_counted(small_demo, tmp_path, monkeypatch):
    """A finite loss whose gradient is NaN (the diverged-run case) must not reach the weights."""
    calls = {"n": 0}

    def nan_gradient(logits, *rest):
        losses = method_losses(logits, *rest)
        calls["n"] += 1
        if calls["n"] == 3:  # iteration 2, micro-batch 1: value + 0, gradient 0 · ∞ = NaN
            losses["loss"] = losses["loss"] + 0.0 * torch.sqrt(logits.sum() * 0.0)
        return losses

    monkeypatch.setattr(affseg.engine.head, "method_losses", nan_gradient)
    record, out = Record(), tmp_path / "r"
    train(tiny_config(small_demo, out), [record])
    state = load_checkpoint(out / LAST_CHECKPOINT)
    assert state["nonfinite"] == 1 and sorted(record.losses) == [1, 3, 4]
    assert all(float(s["step"]) == 3 for s in state["optimiser"]["state"].values())  # 4 iterations, 1 rolled back
    assert finite_checkpoint(out / LAST_CHECKPOINT) and finite_checkpoint(out / BEST_CHECKPOINT)
    calls["n"] = 0
    with pytest.raises(TrainingError, match=r"1 non-finite losses or updates \(train.max_nonfinite=0\)"):
        train(tiny_config(small_demo, tmp_path / "s", "train.max_nonfinite=0"), [])


def test_checkpoint_writer_refuses_nonfinite_tensors(tmp_path):
    state = {"decoder": {"w": torch.tensor([1.0, float("nan")])}, "optimiser": {"state": {}}, "scaler": {}}
    with pytest.raises(TrainingError, match=r"last.pt: refusing to write a checkpoint with non-finite decoder.w;"):
        require_finite(state, tmp_path / LAST_CHECKPOINT)
    state["decoder"]["w"] = torch.ones(2)
    state["scaler"] = {"scale": float("inf")}
    with pytest.raises(TrainingError, match="non-finite scaler.scale"):
        require_finite(state, tmp_path / LAST_CHECKPOINT)


def test_resume_after_midaccumulation_nonfinite_keeps_sample_order(small_demo, tmp_path, monkeypatch):
    original_get = DrawDataset.__getitem__
    calls, draws = {"n": 0, "poison": True}, []

    def poisoned(*args):
        losses = method_losses(*args)
        calls["n"] += 1
        if calls["poison"] and calls["n"] == 1:  # micro-batch 1 of 2 in iteration 1: one left unconsumed
            losses["loss"] = losses["loss"] * float("nan")
        return losses

    def recording(self, key):
        draws.append(key)
        return original_get(self, key)

    monkeypatch.setattr(affseg.engine.head, "method_losses", poisoned)
    monkeypatch.setattr(DrawDataset, "__getitem__", recording)
    full = Record(copy_at=2, copy_to=tmp_path / "at2.pt")
    train(tiny_config(small_demo, tmp_path / "a"), [full])
    full_draws = list(draws)
    assert [draw for _, draw in full_draws] == list(range(4 * 2 * 2))  # iterations × accumulation × batch

    calls["poison"], draws[:] = False, []
    resumed = Record()
    train(tiny_config(small_demo, tmp_path / "b"), [resumed], resume_from=tmp_path / "at2.pt")
    assert draws == full_draws[2 * 2 * 2:]
    for iteration in (3, 4):
        assert resumed.losses[iteration] == pytest.approx(full.losses[iteration], rel=1e-6, abs=1e-7)


def test_resume_refuses_a_changed_schedule(small_demo, tmp_path):
    train(tiny_config(small_demo, tmp_path / "a", "train.iterations=2"), [])
    checkpoint = tmp_path / "a" / LAST_CHECKPOINT
    for name, old, new in [("iterations", 2, 6), ("accumulation", 2, 1), ("batch_size", 2, 1), ("seed", 0, 1)]:
        config = tiny_config(small_demo, tmp_path / "b", "train.iterations=2", f"train.{name}={new}")
        with pytest.raises(TrainingError, match=rf"resume: checkpoint was trained with train.{name}={old}, not {new};"):
            Trainer(config, [], resume_from=checkpoint)


@pytest.mark.parametrize("key", ["n0", "warmup_blocks"])
def test_block_counts_beyond_the_encoder_are_refused(small_demo, tmp_path, key):
    with pytest.raises(ConfigError, match=rf"refine.{key}: 99 must lie in \[1, \d+\] \(the affinity blocks of"):
        Trainer(tiny_config(small_demo, tmp_path / "c", f"refine.{key}=99"))


def test_accumulation_averages_the_micro_batch_gradients(small_demo, tmp_path, monkeypatch):
    """accumulation=2 steps with the mean of the two micro-batches' gradients (dropout off: deterministic)."""
    trainer = Trainer(tiny_config(small_demo, tmp_path / "g", "model.decoder_dropout=0.0"))
    head = trainer.heads[0]
    params = [p for p in head.student.parameters() if p.requires_grad]
    stepped = []
    monkeypatch.setattr(head.scaler, "step", lambda optimiser: stepped.append([p.grad.clone() for p in params]))
    assert trainer._step(iter(trainer._loader()))[head] is not None

    expected = [torch.zeros_like(p) for p in params]
    batches = iter(trainer._loader())
    for _ in range(2):
        batch = next(batches)
        head.student.zero_grad(set_to_none=True)
        taught = trainer.teacher(batch["image"], batch["labels"], batch["valid"])
        output = head.student(taught.features, batch["image"].shape[-2:])
        pseudo = head.labeler(taught, output.aff_dec, 0).pseudo
        method_losses(output.logits, output.aff_dec, pseudo, taught.grid, head.config.loss)["loss"].backward()
        for total, p in zip(expected, params):
            total += p.grad / 2
    for got, want in zip(stepped[0], expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_poly_power_reaches_the_scheduler(small_demo, tmp_path):
    head = Trainer(tiny_config(small_demo, tmp_path / "p", "optim.poly_power=2.0")).heads[0]
    for _ in range(2):
        head.optimiser.step()
        head.scheduler.step()
    assert head.optimiser.param_groups[0]["lr"] == pytest.approx(1e-3 * (1 - 2 / 4) ** 2)


def test_ignore_band_validates(small_demo, tmp_path):
    # ignore-band pseudo-labels hold 255: the pseudo-label quality must score them as "left out", not crash
    config = tiny_config(small_demo, tmp_path / "band", "refine.ignore_band=true", "train.iterations=2",
                         "train.val_interval=2")
    result = train(config, [])
    assert result.iterations_done == 2
    assert 0.0 <= result.best.miou <= 1.0
