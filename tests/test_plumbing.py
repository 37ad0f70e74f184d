"""Config keys reach the function that uses them: a key set to a non-default value changes what
that function receives (a key dropped on the way would leave the default there)."""

from __future__ import annotations

import inspect

import torch
from test_train import tiny_config

import affseg.losses
import affseg.refine.pseudo
from affseg.losses import method_losses
from affseg.method import build_pseudo_labeler, build_student, build_teacher

BATCH, SIZE = 2, 96  # two images of 96 × 96 (a 6 × 6 grid)


def forward_and_loss(root, out, *overrides: str) -> None:
    """One training forward and loss of the tiny random-encoder model on random images."""
    torch.manual_seed(0)
    config = tiny_config(root, out, *overrides)
    teacher = build_teacher(config)
    student, labeler = build_student(config, teacher), build_pseudo_labeler(config)
    images = torch.randn(BATCH, 3, SIZE, SIZE)
    labels = torch.zeros(BATCH, 20)
    labels[:, 0] = 1
    taught = teacher(images, labels)
    output = student(taught.features, images.shape[-2:])
    pseudo = labeler(taught, output.aff_dec, 0).pseudo
    method_losses(output.logits, output.aff_dec, pseudo, taught.grid, config.loss)


def recorder(monkeypatch, module, name: str, parameter: str) -> list:
    """Wrap `module.name` so each call appends the value it got for `parameter` (default included)."""
    original, seen = getattr(module, name), []
    signature = inspect.signature(original)

    def wrapped(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        seen.append(bound.arguments[parameter])
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapped)
    return seen


def test_sinkhorn_iters_reaches_the_transition_matrix(small_demo, tmp_path, monkeypatch):
    value = 5  # SPEC default 3
    seen = recorder(monkeypatch, affseg.refine.pseudo, "transition_matrix", "iters")
    forward_and_loss(small_demo, tmp_path, f"refine.sinkhorn_iters={value}")
    assert seen == [value]


def test_aff_radius_reaches_the_affinity_loss(small_demo, tmp_path, monkeypatch):
    value = 2  # SPEC default 8
    seen = recorder(monkeypatch, affseg.losses, "affinity_loss", "radius")
    forward_and_loss(small_demo, tmp_path, f"loss.aff_radius={value}")
    assert seen == [value]
