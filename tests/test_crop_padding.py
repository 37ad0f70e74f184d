"""Crop padding is ignored everywhere (SPEC §5.1): the crop marks it, CAM min-max, affinities, boxes
and the random walk see only the image cells, and the pseudo-label there is IGNORE_INDEX."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_model import make_model, two_class_items

from affseg.cam import minmax_normalise
from affseg.config import RefineConfig
from affseg.data.classes import IGNORE_INDEX
from affseg.data.transforms import TrainAugment
from affseg.data.voc import VocSegmentation
from affseg.grid import grid_validity
from affseg.refine.pseudo import pseudo_labels, refine_cams

STRIDE = 16
GRID = (6, 5)  # 96 × 80 px
IMAGE_CELLS = (4, 3)  # the image part: 64 × 48 px, the rest is padding
CLASSES = 20
PRESENT = (3, 11)
LAYERS = 8
LOUD = 50.0  # padding values far outside the image's range


def _cells(batch: int = 2) -> torch.Tensor:
    """(B, h, w) bool: the top-left IMAGE_CELLS block is image."""
    cells = torch.zeros(batch, *GRID, dtype=torch.bool)
    cells[:, : IMAGE_CELLS[0], : IMAGE_CELLS[1]] = True
    return cells


def _valid(batch: int = 2) -> torch.Tensor:
    """(B, H, W) pixel mask matching `_cells`."""
    return _cells(batch).repeat_interleave(STRIDE, 1).repeat_interleave(STRIDE, 2)


def _labels(batch: int = 2) -> torch.Tensor:
    labels = torch.zeros(batch, CLASSES)
    labels[:, list(PRESENT)] = 1
    return labels


def _cams(generator: torch.Generator, batch: int = 2) -> torch.Tensor:
    """(B, 20, h, w) blobs in [0, 1] on the present classes only."""
    cams = torch.zeros(batch, CLASSES, *GRID)
    cams[:, list(PRESENT)] = torch.rand(batch, len(PRESENT), *GRID, generator=generator)
    return cams


def _loud_padding(tensor: torch.Tensor, cells: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The same tensor with large random values wherever a cell outside `cells` is involved.

    tensor: (B, ..., h, w) maps or (B, ..., N, N) affinities."""
    noise = LOUD * torch.rand(tensor.shape, generator=generator)
    if tensor.shape[-2:] == cells.shape[-2:]:
        outside = ~cells.view(cells.shape[0], *([1] * (tensor.dim() - 3)), *cells.shape[-2:])
    else:
        inside = cells.flatten(1)
        pairs = inside[:, :, None] & inside[:, None, :]
        outside = ~pairs.view(pairs.shape[0], *([1] * (tensor.dim() - 3)), *pairs.shape[-2:])
    return torch.where(outside, noise, tensor)


def test_training_crop_marks_exactly_its_padding():
    height, width, crop = 20, 30, 64
    image = np.full((height, width, 3), 200, np.uint8)
    mask = np.ones((height, width), np.uint8)  # no ignore pixel of its own
    augment = TrainAugment(crop_size=crop, scale_min=1.0, scale_max=1.0, flip_prob=0.0)
    tensor, target, valid = augment(image, mask, np.random.default_rng(0))
    assert valid.shape == (crop, crop) and valid.dtype == torch.bool
    assert int(valid.sum()) == height * width
    assert torch.equal(valid, target != IGNORE_INDEX)
    assert torch.allclose(tensor[:, ~valid], torch.zeros(1), atol=1e-5)  # padding is the mean colour


def test_dataset_items_carry_the_validity_mask(small_demo):
    crop = 320  # larger than every demo image at scale 1: every crop has padding
    augmented = VocSegmentation(small_demo, "train_aug", TrainAugment(crop, 1.0, 1.0, 0.0))[0]
    assert augmented["valid"].shape == (crop, crop) and not bool(augmented["valid"].all())
    plain = VocSegmentation(small_demo, "val")[0]
    assert plain["valid"].shape == plain["mask"].shape and bool(plain["valid"].all())


def test_grid_validity_counts_partly_covered_cells_as_image():
    valid = torch.zeros(1, 40, 35, dtype=torch.bool)
    valid[:, :20, :17] = True  # 20 rows → 2 cells, 17 columns → 2 cells
    expected = torch.zeros(1, 3, 3, dtype=torch.bool)
    expected[:, :2, :2] = True
    assert torch.equal(grid_validity(valid, (3, 3)), expected)


def test_minmax_runs_over_image_cells_only():
    generator = torch.Generator().manual_seed(0)
    cells = _cells()
    maps = torch.rand(2, 3, *GRID, generator=generator)
    loud = _loud_padding(maps, cells, generator)
    out = minmax_normalise(loud, cells=cells)
    image = out[:, :, : IMAGE_CELLS[0], : IMAGE_CELLS[1]]
    expected = minmax_normalise(maps[:, :, : IMAGE_CELLS[0], : IMAGE_CELLS[1]].contiguous())
    assert torch.allclose(image, expected, atol=1e-6)
    assert torch.equal(out * ~cells[:, None], torch.zeros_like(out))


@pytest.mark.parametrize("refined", [False, True], ids=["warm-up", "with A_f"])
def test_refinement_never_sees_the_padding(refined):
    generator = torch.Generator().manual_seed(1)
    cells = _cells()
    cells_n = GRID[0] * GRID[1]
    cams = _cams(generator)
    aff_enc = torch.rand(2, LAYERS, cells_n, cells_n, generator=generator)
    aff_dec = torch.rand(2, cells_n, cells_n, generator=generator) if refined else None
    cfg = RefineConfig()
    clean = refine_cams(cams * cells[:, None], aff_enc * _pairs(cells)[:, None],
                        None if aff_dec is None else aff_dec * _pairs(cells), cfg, cells=cells)
    loud = refine_cams(_loud_padding(cams, cells, generator), _loud_padding(aff_enc, cells, generator),
                       None if aff_dec is None else _loud_padding(aff_dec, cells, generator), cfg, cells=cells)
    assert torch.allclose(clean, loud, atol=1e-6)
    assert torch.equal(loud * ~cells[:, None], torch.zeros_like(loud))
    assert bool(loud[:, list(PRESENT)].amax() > 0)


def _pairs(cells: torch.Tensor) -> torch.Tensor:
    inside = cells.flatten(1)
    return (inside[:, :, None] & inside[:, None, :]).float()


@pytest.mark.parametrize("use_par", [False, True])
def test_pseudo_labels_on_padding_are_ignored_and_padding_scores_do_not_matter(use_par):
    generator = torch.Generator().manual_seed(2)
    cells, valid = _cells(), _valid()
    maps = _cams(generator)
    images = torch.randn(2, 3, GRID[0] * STRIDE, GRID[1] * STRIDE, generator=generator)
    cfg = RefineConfig()
    loud = pseudo_labels(_loud_padding(maps, cells, generator), _labels(), images, cfg, use_par, valid=valid)
    quiet = pseudo_labels(maps * cells[:, None], _labels(), images, cfg, use_par, valid=valid)
    assert torch.equal(loud, quiet)
    assert bool((loud[~valid] == IGNORE_INDEX).all())
    assert not bool((loud[valid] == IGNORE_INDEX).any())


def test_model_forward_ignores_crop_padding(small_demo, tmp_path):
    model = make_model(small_demo, tmp_path).eval()
    images, labels = two_class_items(small_demo, 2)
    valid = torch.zeros(images.shape[0], *images.shape[-2:], dtype=torch.bool)
    valid[:, :80, :60] = True  # 5 × 4 image cells of the 8 × 6 grid
    output = model(images, labels, iteration=0, valid=valid)
    cells = grid_validity(valid, output.cams.shape[-2:])
    assert torch.equal(output.pseudo == IGNORE_INDEX, ~valid)
    assert torch.equal(output.cams * ~cells[:, None], torch.zeros_like(output.cams))
    assert torch.equal(output.refined * ~cells[:, None], torch.zeros_like(output.refined))
    present = labels > 0
    peaks = output.cams.flatten(2).amax(dim=2)
    assert torch.allclose(peaks[present], torch.ones(int(present.sum())))  # max 1 over the image cells


def test_trainer_hands_each_crop_its_padding(small_demo, tmp_path, monkeypatch):
    from test_train import tiny_config

    from affseg.engine.trainer import Trainer
    from affseg.method import Teacher

    config = tiny_config(small_demo, tmp_path, "data.crop_size=320", "data.scale_min=1.0", "data.scale_max=1.0",
                         "train.iterations=1", "train.val_interval=1")
    seen = []
    forward = Teacher.forward

    def spy(self, images, labels, valid=None, slots=None):
        seen.append(valid)
        return forward(self, images, labels, valid, slots)

    monkeypatch.setattr(Teacher, "forward", spy)
    trainer = Trainer(config)
    head = trainer.heads[0]
    pseudo = []
    labeler = head.labeler.__class__.__call__
    monkeypatch.setattr(head.labeler.__class__, "__call__",
                        lambda self, *args: pseudo.append(labeler(self, *args).pseudo) or labeler(self, *args))
    trainer._step(iter(trainer._loader()))
    assert len(seen) == len(pseudo) == config.train.accumulation
    for valid, labels in zip(seen, pseudo):
        assert valid is not None and not bool(valid.all())  # demo images are smaller than 320 px
        assert bool((labels[~valid] == IGNORE_INDEX).all())
