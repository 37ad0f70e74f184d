"""PAR: growth factor, no leak across a colour edge, and a per-pixel reference on a tiny image."""

from __future__ import annotations

import math

import torch

from affseg.config import ParConfig
from affseg.refine.par import neighbour_offsets, par

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def _par(images: torch.Tensor, maps: torch.Tensor, cfg: ParConfig) -> torch.Tensor:
    return par(images, maps, cfg.dilations, cfg.iterations, cfg.w1, cfg.w2, cfg.scale)


def test_forty_eight_neighbours():
    offsets = neighbour_offsets([1, 2, 4, 8, 12, 24])
    assert len(offsets) == 48 == len(set(offsets))
    assert (0, 0) not in offsets and (-24, 24) in offsets


def test_constant_map_grows_by_one_plus_w2_per_iteration():
    torch.manual_seed(0)
    cfg = ParConfig(iterations=5)
    images = torch.rand(2, 3, 12, 10)
    maps = torch.full((2, 3, 12, 10), 0.7)
    out = _par(images, maps, cfg)
    assert torch.allclose(out, torch.full_like(out, 0.7 * (1 + cfg.w2) ** 5), rtol=1e-5)


def _two_colour(height: int = 16, width: int = 16) -> torch.Tensor:
    image = torch.empty(1, 3, height, width)
    image[..., : width // 2] = torch.tensor([0.2, 0.3, 0.4]).view(1, 3, 1, 1)
    image[..., width // 2 :] = torch.tensor([0.9, 0.1, 0.5]).view(1, 3, 1, 1)
    return image


def test_no_leak_across_colour_edge():
    cfg = ParConfig()  # 20 iterations, all six dilations
    image = _two_colour()
    maps = torch.zeros(1, 1, 16, 16)
    maps[..., :8] = 1.0
    out = _par(image, maps, cfg)[0, 0]
    left, right = out[:, :8], out[:, 8:]
    assert left.min() > 1.0  # grew by (1 + w2)^20 ≈ 1.22, up to the small positional leak
    assert right.max() < 0.05 * left.min()


def test_normalised_image_gives_same_result():
    torch.manual_seed(1)
    image = torch.rand(1, 3, 10, 9)
    maps = torch.rand(1, 2, 10, 9)
    cfg = ParConfig(iterations=3)
    plain = _par(image, maps, cfg)
    normalised = _par((image - IMAGENET_MEAN) / IMAGENET_STD, maps, cfg)
    assert torch.allclose(plain, normalised, atol=1e-5)


def _reference(image: torch.Tensor, maps: torch.Tensor, cfg: ParConfig) -> torch.Tensor:
    """Pixel-by-pixel PAR, written straight from the formula (tiny inputs only)."""
    _, height, width = image.shape
    offsets = neighbour_offsets(cfg.dilations)
    lengths = torch.tensor([math.hypot(dy, dx) for dy, dx in offsets])
    pos_logits = -(lengths / (lengths.std() * cfg.w1)) ** 2
    pos = torch.softmax(pos_logits, 0)
    kernel = torch.zeros(len(offsets), height, width)
    for y in range(height):
        for x in range(width):
            pixels = torch.stack(
                [image[:, min(max(y + dy, 0), height - 1), min(max(x + dx, 0), width - 1)] for dy, dx in offsets]
            )  # (P, 3)
            std = pixels.std(dim=0)
            colour = -(((pixels - image[:, y, x]).abs() / ((std + 1e-8) * cfg.w1)) ** 2).mean(dim=1)
            kernel[:, y, x] = torch.softmax(colour, 0) + cfg.w2 * pos
    for _ in range(cfg.iterations):
        new = torch.zeros_like(maps)
        for y in range(height):
            for x in range(width):
                for p, (dy, dx) in enumerate(offsets):
                    ny, nx = min(max(y + dy, 0), height - 1), min(max(x + dx, 0), width - 1)
                    new[:, y, x] += kernel[p, y, x] * maps[:, ny, nx]
        maps = new
    return maps


def test_matches_pixel_reference():
    torch.manual_seed(2)
    cfg = ParConfig(iterations=2, dilations=[1, 3])
    image = torch.rand(1, 3, 5, 6)
    maps = torch.rand(1, 2, 5, 6)
    assert torch.allclose(_par(image, maps, cfg)[0], _reference(image[0], maps[0], cfg), atol=1e-5)


def test_half_scale_keeps_size_and_edge():
    cfg = ParConfig(scale=0.5)
    image = _two_colour(32, 32)
    maps = torch.zeros(1, 2, 32, 32)
    maps[:, 0, :, :16] = 1.0
    maps[:, 1, :, 16:] = 1.0
    out = _par(image, maps, cfg)
    assert out.shape == maps.shape
    assert (out[0, 0, :, :14] > out[0, 1, :, :14]).all() and (out[0, 1, :, 18:] > out[0, 0, :, 18:]).all()
