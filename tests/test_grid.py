"""The grid ↔ pixels rule (SPEC §5.1): a grid map covers the padded input, never stretched (issue 9, item 6)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from affseg.config import EvalConfig
from affseg.engine.runtime import Runtime
from affseg.grid import grid_to_pixels, pixels_to_grid
from affseg.method import StudentOutput
from affseg.predict import Predictor

STRIDE = 16


@pytest.mark.parametrize("size", [(500, 333), (40, 24), (37, 53)])
def test_hot_cell_lands_on_its_16_pixel_block(size):
    height, width = size
    grid = (-(-height // STRIDE), -(-width // STRIDE))
    row, col = grid[0] - 1, grid[1] // 2  # the last row: the one a stretch moves most
    maps = torch.zeros(1, 1, *grid)
    maps[0, 0, row, col] = 1.0
    pixels = grid_to_pixels(maps, size)[0, 0]
    assert pixels.shape == size
    peak = (pixels == pixels.max()).nonzero()
    centre = peak.float().mean(dim=0)
    expected = torch.tensor([row * STRIDE + STRIDE / 2 - 0.5, col * STRIDE + STRIDE / 2 - 0.5])
    inside = torch.minimum(expected, torch.tensor([height - 1.0, width - 1.0]))
    assert torch.all((centre - inside).abs() <= STRIDE / 2), (centre, expected)
    stretched = F.interpolate(maps, size=size, mode="bilinear", align_corners=False)[0, 0]
    if height % STRIDE:  # the old rule put the hot cell elsewhere
        assert not torch.allclose(stretched, pixels)


def test_multiple_of_stride_equals_plain_upsampling():
    maps = torch.rand(2, 3, 14, 14)
    plain = F.interpolate(maps, size=(224, 224), mode="bilinear", align_corners=False)
    assert torch.equal(grid_to_pixels(maps, (224, 224)), plain)


def test_grid_must_cover_the_image():
    with pytest.raises(ValueError, match="does not cover"):
        grid_to_pixels(torch.zeros(1, 1, 2, 2), (40, 16))


def test_pixels_to_grid_takes_each_cells_first_pixel():
    labels = torch.arange(37 * 53).reshape(1, 37, 53)
    small = pixels_to_grid(labels, (3, 4))
    assert small.shape == (1, 3, 4)
    assert small[0, 2, 3] == labels[0, 32, 48]
    square = torch.randint(0, 21, (2, 64, 48))
    nearest = F.interpolate(square[:, None].float(), size=(4, 3), mode="nearest").long()[:, 0]
    assert torch.equal(pixels_to_grid(square, (4, 3)), nearest)  # the old rule where it was right


class SizeProbe(torch.nn.Module):
    """Stands in for the teacher in the Predictor: records the sizes it encodes, returns one zero block."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def features(self, images):
        self.sizes.append(tuple(images.shape[-2:]))
        return [torch.zeros(images.shape[0], 1, -(-images.shape[-2] // STRIDE), -(-images.shape[-1] // STRIDE))]


def zero_student(features, size):
    return StudentOutput(logits=torch.zeros(features[0].shape[0], 21, *size), aff_dec=None)


def test_evaluation_keeps_the_exact_aspect_ratio():
    probe = SizeProbe()
    cfg = EvalConfig(long_side=512, scales=[1.0, 0.75], flip=False)
    predictor = Predictor(probe, zero_student, Runtime(torch.device("cpu"), None), cfg)
    probs = predictor.probs(torch.zeros(1, 3, 333, 500))
    assert probs.shape == (1, 21, 333, 500)
    assert probe.sizes == [(341, 512), (256, 384)]
