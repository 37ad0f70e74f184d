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

Layout (issue 13): a batch is a table of N = B·h·w pixel rows. Every pixel's P
neighbours are row numbers into that table (borders clamped), so κ is computed
from one gather, and one iteration M ← Σ_p κ_p M_p is one `F.embedding_bag`
(sum of the P neighbour rows weighted by κ, a fixed-width sparse × dense product)
instead of P shifted multiply-adds: ~2 kernel launches an iteration, not ~50.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

STD_EPS = 1e-8  # added to σ so that flat regions (σ = 0, |ΔI| = 0) give a 0 logit, not NaN
INT32_ROWS = 2**31 - 1  # neighbour rows are int32 while N·P stays below this (half the index memory)


def neighbour_offsets(dilations: list[int]) -> list[tuple[int, int]]:
    """The (dy, dx) of the 8 neighbours at each dilation, dilation by dilation."""
    ring = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]
    return [(dy * d, dx * d) for d in dilations for dy, dx in ring]


def neighbour_pixels(size: tuple[int, int], dilations: list[int], device: torch.device) -> Tensor:
    """Index y·w + x of each pixel's neighbours in an h×w image, borders repeated → (h·w, P) int64."""
    height, width = size
    offsets = torch.tensor(neighbour_offsets(dilations), device=device)  # (P, 2)
    rows = (torch.arange(height, device=device)[:, None] + offsets[:, 0]).clamp(0, height - 1)  # (h, P)
    cols = (torch.arange(width, device=device)[:, None] + offsets[:, 1]).clamp(0, width - 1)  # (w, P)
    return (rows[:, None, :] * width + cols[None, :, :]).view(height * width, -1)


def par_kernel(images: Tensor, dilations: list[int], w1: float, w2: float,
               within: Tensor | None = None) -> Tensor:
    """κ for every pixel and neighbour. images: (B, 3, H, W) → (B, H·W, P), P = 8·len(dilations).

    within: `neighbour_pixels` of this size when already built."""
    batch, channels, height, width = images.shape
    if within is None:
        within = neighbour_pixels((height, width), dilations, images.device)
    count = within.shape[1]
    flat = images.reshape(batch * channels, height * width)
    neighbours = flat.index_select(1, within.view(-1)).view(batch, channels, height * width, count)  # (B, 3, H·W, P)
    mean = neighbours.sum(dim=-1, keepdim=True) / count
    deviation = neighbours.sub_(mean)  # in place: the neighbours are not needed again
    scale = (torch.linalg.vector_norm(deviation, dim=-1, keepdim=True) / math.sqrt(count - 1) + STD_EPS) * w1
    difference = deviation.add_(mean - flat.view(batch, channels, -1, 1))  # I_p − I, (B, 3, H·W, P)
    colour = difference.div_(scale).pow_(2).mean(dim=1).neg_()  # (B, H·W, P); the square makes |·| moot

    lengths = torch.tensor([math.hypot(dy, dx) for dy, dx in neighbour_offsets(dilations)],
                           dtype=images.dtype, device=images.device)
    position = -(lengths / ((lengths.std() + STD_EPS) * w1)).pow(2)
    return colour.softmax(dim=-1).add_(w2 * position.softmax(dim=0))


@dataclass(frozen=True)
class ParKernel:
    """κ of one batch laid out for `F.embedding_bag`: pixel n's neighbours are
    `neighbours[bags[n]:bags[n + 1]]` with weights `weights[bags[n]:bags[n + 1]]`.

    neighbours, weights: (N·P,); bags: (N + 1,); N = B·h·w at PAR's working size `size` (h, w)."""

    neighbours: Tensor
    bags: Tensor
    weights: Tensor
    size: tuple[int, int]


def _working_size(size: tuple[int, int], scale: float) -> tuple[int, int]:
    return (max(1, round(size[0] * scale)), max(1, round(size[1] * scale))) if scale < 1.0 else tuple(size)


@torch.no_grad()
def image_kernel(images: Tensor, dilations: list[int], w1: float, w2: float, scale: float = 1.0) -> ParKernel:
    """κ of `images` (B, 3, H, W) at PAR's working size (H, W scaled by `scale`).

    It depends on the images and the PAR settings only, so the heads of a fused group share it."""
    size = _working_size(images.shape[-2:], scale)
    if size != tuple(images.shape[-2:]):
        images = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
    within = neighbour_pixels(size, dilations, images.device)  # (h·w, P)
    weights = par_kernel(images, dilations, w1, w2, within=within)  # (B, h·w, P)
    batch, pixels, count = weights.shape
    index_type = torch.int32 if weights.numel() <= INT32_ROWS else torch.int64
    first = torch.arange(0, batch * pixels, pixels, device=images.device).view(batch, 1, 1)  # image b's row 0
    neighbours = (within.to(index_type) + first.to(index_type)).view(-1)
    bags = torch.arange(0, neighbours.numel() + 1, count, dtype=index_type, device=images.device)
    return ParKernel(neighbours=neighbours, bags=bags, weights=weights.view(-1), size=size)


def propagate(kernel: ParKernel, maps: Tensor, iterations: int) -> Tensor:
    """`iterations` of M ← Σ_p κ_p M_p. maps: (B, K, h, w) at the kernel's size → (B, K, h, w)."""
    batch, channels = maps.shape[:2]
    table = maps.to(kernel.weights.dtype).permute(0, 2, 3, 1).reshape(-1, channels)  # (B·h·w, K), row n = pixel n
    for _ in range(iterations):
        table = F.embedding_bag(kernel.neighbours, table, kernel.bags, mode="sum",
                                per_sample_weights=kernel.weights, include_last_offset=True)
    return table.view(batch, *kernel.size, channels).permute(0, 3, 1, 2).to(maps.dtype)


@torch.no_grad()
def par(images: Tensor, maps: Tensor, dilations: list[int], iterations: int, w1: float, w2: float,
        scale: float = 1.0, kernel: ParKernel | None = None) -> Tensor:
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
    if kernel.size != _working_size(size, scale):
        raise ValueError(f"PAR kernel of size {kernel.size} for maps {tuple(size)} at scale {scale}")
    if kernel.size != tuple(size):
        maps = F.interpolate(maps, size=kernel.size, mode="bilinear", align_corners=False)
    refined = propagate(kernel, maps, iterations)
    if kernel.size != tuple(size):
        refined = F.interpolate(refined, size=size, mode="bilinear", align_corners=False)
    return refined.contiguous()
