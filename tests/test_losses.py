"""Segmentation and affinity losses against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from affseg.data.classes import IGNORE_INDEX
from affseg.losses import affinity_labels, affinity_loss, radius_mask, segmentation_loss, total_loss

# 2 classes on a 2×2 image; per-pixel logits (class 0, class 1)
LOGITS = torch.tensor([[[[2.0, 0.0], [1.0, 0.0]], [[0.0, 1.0], [3.0, 0.0]]]])  # (1, 2, 2, 2)
TARGET = torch.tensor([[[0, 1], [1, IGNORE_INDEX]]])


def _ce(own: float, other: float) -> float:
    return math.log(math.exp(own) + math.exp(other)) - own


CE_BG = _ce(2.0, 0.0)  # pixel (0, 0), target 0
CE_FG = [_ce(1.0, 0.0), _ce(3.0, 1.0)]  # pixels (0, 1) and (1, 0), target 1


def test_plain_segmentation_loss():
    expected = (CE_BG + sum(CE_FG)) / 3
    assert segmentation_loss(LOGITS, TARGET, "plain").item() == pytest.approx(expected, rel=1e-6)


def test_balanced_segmentation_loss():
    expected = 0.5 * CE_BG + 0.5 * sum(CE_FG) / 2
    assert segmentation_loss(LOGITS, TARGET, "balanced").item() == pytest.approx(expected, rel=1e-6)


def test_balanced_with_one_empty_set_gives_the_other_full_weight():
    only_fg = torch.tensor([[[IGNORE_INDEX, 1], [1, IGNORE_INDEX]]])
    assert segmentation_loss(LOGITS, only_fg, "balanced").item() == pytest.approx(sum(CE_FG) / 2, rel=1e-6)


def test_all_ignored_is_zero_with_gradient():
    logits = LOGITS.clone().requires_grad_(True)
    target = torch.full((1, 2, 2), IGNORE_INDEX)
    for mode in ("balanced", "plain"):
        loss = segmentation_loss(logits, target, mode)
        assert loss.item() == 0.0
        loss.backward()
        assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_radius_mask_is_chebyshev():
    mask = radius_mask((3, 3), 1)
    assert mask[4].all()  # the centre touches all nine cells
    assert mask[0].tolist() == [True, True, False, True, True, False, False, False, False]


def test_affinity_labels_on_two_by_two_grid():
    cells = torch.tensor([[[0, 1], [1, IGNORE_INDEX]]])
    pseudo = cells.repeat_interleave(16, dim=1).repeat_interleave(16, dim=2)  # 16-px cells → [[0, 1], [1, ignore]]
    positive, negative = affinity_labels(pseudo, (2, 2), radius=1)
    pos = torch.zeros(4, 4, dtype=torch.bool)
    for i, j in [(0, 0), (1, 1), (2, 2), (1, 2), (2, 1)]:
        pos[i, j] = True
    neg = torch.zeros(4, 4, dtype=torch.bool)
    for i, j in [(0, 1), (1, 0), (0, 2), (2, 0)]:
        neg[i, j] = True
    assert torch.equal(positive[0], pos) and torch.equal(negative[0], neg)
    near, far = affinity_labels(pseudo, (2, 2), radius=0)
    assert torch.equal(near[0], torch.eye(4, dtype=torch.bool) & pos) and not far.any()


AFF = torch.tensor([[[0.9, 0.2, 0.3, 0.5], [0.2, 0.8, 0.6, 0.5], [0.3, 0.6, 0.7, 0.5], [0.5, 0.5, 0.5, 0.5]]])
PSEUDO = torch.tensor([[[0, 1], [1, IGNORE_INDEX]]]).repeat_interleave(16, dim=1).repeat_interleave(16, dim=2)  # 2×2 cells of 16 px


def test_linear_affinity_loss():
    positives = [0.9, 0.8, 0.7, 0.6, 0.6]  # (0,0), (1,1), (2,2), (1,2), (2,1)
    negatives = [0.2, 0.2, 0.3, 0.3]  # (0,1), (1,0), (0,2), (2,0)
    expected = 0.5 * sum(1 - a for a in positives) / 5 + 0.5 * sum(negatives) / 4
    loss = affinity_loss(AFF, PSEUDO, (2, 2), radius=1, mode="linear")
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_bce_affinity_loss():
    positives = [0.9, 0.8, 0.7, 0.6, 0.6]
    negatives = [0.2, 0.2, 0.3, 0.3]
    expected = 0.5 * sum(-math.log(a) for a in positives) / 5 + 0.5 * sum(-math.log(1 - a) for a in negatives) / 4
    loss = affinity_loss(AFF, PSEUDO, (2, 2), radius=1, mode="bce")
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_affinity_loss_empty_negatives_contribute_zero():
    uniform = torch.zeros(1, 32, 32, dtype=torch.long)  # 2×2 cells of 16 px, one label
    aff = AFF.clone().requires_grad_(True)
    loss = affinity_loss(aff, uniform, (2, 2), radius=1, mode="linear")
    assert loss.item() == pytest.approx(0.5 * (1 - AFF).mean().item(), rel=1e-6)
    loss.backward()
    assert aff.grad is not None


def test_total_loss():
    assert total_loss(torch.tensor(2.0), torch.tensor(3.0), 0.1).item() == pytest.approx(2.3)
