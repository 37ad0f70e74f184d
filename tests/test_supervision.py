"""`train.supervision=full`: the ground-truth masks train the same decoder with the same losses (the fully
supervised upper bound of weak/full)."""

from __future__ import annotations

import pytest
import torch
from test_train import tiny_config

import affseg.engine.head
from affseg.config import ConfigError
from affseg.engine.trainer import Trainer
from affseg.losses import method_losses


@pytest.mark.parametrize("supervision", ["pseudo", "full"])
def test_the_target_is_the_ground_truth_only_under_full_supervision(small_demo, tmp_path, monkeypatch, supervision):
    targets = []

    def recording(logits, aff_dec, target, grid, cfg):
        targets.append(target.clone())
        return method_losses(logits, aff_dec, target, grid, cfg)

    monkeypatch.setattr(affseg.engine.head, "method_losses", recording)
    trainer = Trainer(tiny_config(small_demo, tmp_path, f"train.supervision={supervision}"))
    assert trainer._step(iter(trainer._loader()))[trainer.heads[0]] is not None
    replay = iter(trainer._loader())  # the same seeded batches again
    masks = [next(replay)["mask"] for _ in range(trainer.config.train.accumulation)]
    assert len(targets) == len(masks)
    for target, mask in zip(targets, masks):
        assert torch.equal(target, mask) == (supervision == "full")


def test_unknown_supervision_is_one_line(small_demo, tmp_path):
    with pytest.raises(ConfigError, match="train.supervision"):
        tiny_config(small_demo, tmp_path, "train.supervision=strong")
