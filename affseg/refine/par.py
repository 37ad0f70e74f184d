"""Pixel-adaptive refinement, PAR (SPEC §2.4 step 9, eq. 3.17; after AFA).

Each pixel repeatedly takes a weighted sum of its dilated 8-neighbourhoods
(48 neighbours for dilations 1, 2, 4, 8, 12, 24); the weights mix colour
similarity and spatial closeness:

    κ_p = softmax_p(−mean_rgb (|I − I_p| / (σ_I · w1))²) + w2 · softmax_p(−(|Δp| / (σ_P · w1))²)

σ_I is the per-pixel, per-channel standard deviation of the neighbours' values
(unbiased), σ_P the standard deviation of the neighbour offsets' lengths. κ sums
to 1 + w2 at every pixel, so a map grows by (1 + w2)^iterations; argmax is not
affected. Neighbours outside the image repeat the border pixel.

The colour term is invariant to a per-channel affine change of the image, so the
ImageNet-normalised tensor the model sees gives the same κ as the [0, 1] image.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

STD_EPS = 1e-8  # added to σ so that flat regions (σ = 0, |ΔI| = 0) give a 0 logit, not NaN


def neighbour_offsets(dilations: list[int]) -> list[tuple[int, int]]:
    """The (dy, dx) of the 8 neighbours at each dilation, dilation by dilation."""
    ring = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]
    return [(dy * d, dx * d) for d in dilations for dy, dx in ring]


def _shifted(padded: Tensor, offset: tuple[int, int], pad: int, size: tuple[int, int]) -> Tensor:
    """The view of a replicate-padded (…, H + 2·pad, W + 2·pad) tensor seen from `offset`."""
    dy, dx = offset
    height, width = size
    return padded[..., pad + dy : pad + dy + height, pad + dx : pad + dx + width]


def par_kernel(images: Tensor, dilations: list[int], w1: float, w2: float) -> Tensor:
    """κ for every pixel and neighbour. images: (B, 3, H, W) → (B, P, H, W), P = 8·len(dilations)."""
    offsets = neighbour_offsets(dilations)
    pad = max(dilations)
    size = images.shape[-2:]
    padded = F.pad(images, (pad, pad, pad, pad), mode="replicate")
    neighbours = [_shifted(padded, offset, pad, size) for offset in offsets]

    mean = sum(neighbours) / len(neighbours)
    var = sum((n - mean).pow(2) for n in neighbours) / (len(neighbours) - 1)
    scale = (var.sqrt() + STD_EPS) * w1  # (B, 3, H, W)
    colour = torch.stack([-((images - n).abs() / scale).pow(2).mean(dim=1) for n in neighbours], dim=1)

    lengths = torch.tensor([math.hypot(dy, dx) for dy, dx in offsets], dtype=images.dtype, device=images.device)
    position = -(lengths / ((lengths.std() + STD_EPS) * w1)).pow(2)
    return colour.softmax(dim=1) + w2 * position.softmax(dim=0).view(1, -1, 1, 1)


def _propagate(kernel: Tensor, maps: Tensor, dilations: list[int], iterations: int) -> Tensor:
    """`iterations` of M ← Σ_p κ_p M_p. kernel: (B, P, H, W); maps: (B, K, H, W)."""
    offsets = neighbour_offsets(dilations)
    pad = max(dilations)
    size = maps.shape[-2:]
    for _ in range(iterations):
        padded = F.pad(maps, (pad, pad, pad, pad), mode="replicate")
        out = torch.zeros_like(maps)
        for index, offset in enumerate(offsets):
            out.addcmul_(kernel[:, index : index + 1], _shifted(padded, offset, pad, size))
        maps = out
    return maps


def _working_size(size: tuple[int, int], scale: float) -> tuple[int, int]:
    return (max(1, round(size[0] * scale)), max(1, round(size[1] * scale))) if scale < 1.0 else tuple(size)


@torch.no_grad()
def image_kernel(images: Tensor, dilations: list[int], w1: float, w2: float, scale: float = 1.0) -> Tensor:
    """κ of `images` (B, 3, H, W) at PAR's working size (H, W scaled by `scale`) → (B, P, h', w').

    It depends on the images and the PAR settings only, so the heads of a fused group share it."""
    size = _working_size(images.shape[-2:], scale)
    if size != tuple(images.shape[-2:]):
        images = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
    return par_kernel(images, dilations, w1, w2)


@torch.no_grad()
def par(images: Tensor, maps: Tensor, dilations: list[int], iterations: int, w1: float, w2: float,
        scale: float = 1.0, kernel: Tensor | None = None) -> Tensor:
    """Refine score maps along image colour and position (the module docstring's κ, `iterations` times).

    images: (B, 3, H, W), the (ImageNet-normalised) tensor the model sees;
    maps: (B, K, H, W) at image size. With `scale` < 1 both are resized
    (bilinear) by that factor, refined, and the maps resized back to H×W.
    kernel: `image_kernel(images, dilations, w1, w2, scale)` when already computed.
    Returns (B, K, H, W).
    """
    size = maps.shape[-2:]
    if images.shape[-2:] != size:
        raise ValueError(f"images {tuple(images.shape[-2:])} and maps {tuple(size)} differ in size")
    if kernel is None:
        kernel = image_kernel(images, dilations, w1, w2, scale)
    small = _working_size(size, scale)
    if small != tuple(size):
        maps = F.interpolate(maps, size=small, mode="bilinear", align_corners=False)
    refined = _propagate(kernel, maps, dilations, iterations)
    if small != tuple(size):
        refined = F.interpolate(refined, size=size, mode="bilinear", align_corners=False)
    return refined
