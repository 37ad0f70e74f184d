"""The stride-16 grid ↔ pixels rule (SPEC §5.1), shared by training, validation, evaluation and the
promoted model.

The encoder pads an (H, W) input on the bottom/right and keeps the (ceil(H/16), ceil(W/16)) cells that
cover the image, so cell (i, j) covers pixels [16i, 16i + 16) × [16j, 16j + 16) of the padded input.
A grid map therefore goes to pixels by upsampling to the padded extent (16·h, 16·w) and cropping to
H × W; stretching it onto H × W instead would shift it by up to 15/16 of a cell.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from affseg.backbones.base import GRID_STRIDE


def grid_to_pixels(maps: Tensor, size: tuple[int, int], stride: int = GRID_STRIDE) -> Tensor:
    """Bilinear (B, C, h, w) grid maps → (B, C, H, W) over the image they were computed from.

    Raises ValueError when the grid does not cover `size` (h·stride < H or w·stride < W).
    """
    height, width = size
    rows, cols = maps.shape[-2:]
    if rows * stride < height or cols * stride < width:
        raise ValueError(f"a {rows}x{cols} grid at stride {stride} does not cover {height}x{width} pixels")
    padded = F.interpolate(maps, size=(rows * stride, cols * stride), mode="bilinear", align_corners=False)
    return padded[..., :height, :width]


def pixels_to_grid(labels: Tensor, grid: tuple[int, int], stride: int = GRID_STRIDE) -> Tensor:
    """(B, H, W) labels → (B, h, w) on the grid of the same image: each cell takes the label of its first
    pixel (16i, 16j), which is `F.interpolate(mode="nearest")` whenever H and W are multiples of `stride`
    and, unlike it, never stretches when they are not. Raises ValueError when `grid` is not that grid."""
    sampled = labels[..., ::stride, ::stride]
    if tuple(sampled.shape[-2:]) != tuple(grid):
        raise ValueError(f"labels of {tuple(labels.shape[-2:])} px lie on a {tuple(sampled.shape[-2:])} grid, "
                         f"not {tuple(grid)}")
    return sampled


def grid_validity(valid: Tensor, grid: tuple[int, int], stride: int = GRID_STRIDE) -> Tensor:
    """(B, H, W) bool image pixels (False on crop padding) → (B, h, w) bool: a cell is image when any of
    its pixels is. The encoder's own bottom/right padding counts as not image."""
    rows, cols = grid
    height, width = valid.shape[-2:]
    if rows * stride < height or cols * stride < width:
        raise ValueError(f"a {rows}x{cols} grid at stride {stride} does not cover {height}x{width} pixels")
    padded = F.pad(valid, (0, cols * stride - width, 0, rows * stride - height), value=False)
    blocks = padded.view(*valid.shape[:-2], rows, stride, cols, stride)
    return torch.amax(blocks, dim=(-3, -1))


def stage_to_grid(block: Tensor, stride: int, grid: tuple[int, int]) -> Tensor:
    """(B, C, ceil(H/s), ceil(W/s)) block map at stride s → (B, C, h, w) on the stride-16 grid (SPEC §5.3).

    Finer stages (s < 16) are average-pooled with kernel 16/s; a window reaching past the map (its padded
    extent) averages the cells it covers. Coarser ones (s > 16) are upsampled ×(s/16), bilinear. Both
    are then cropped to `grid` = (ceil(H/16), ceil(W/16))."""
    if stride < GRID_STRIDE:
        ratio = GRID_STRIDE // stride
        block = F.avg_pool2d(block, kernel_size=ratio, stride=ratio, ceil_mode=True)
    elif stride > GRID_STRIDE:
        block = F.interpolate(block, scale_factor=stride // GRID_STRIDE, mode="bilinear", align_corners=False)
    if block.shape[-2] < grid[0] or block.shape[-1] < grid[1]:
        raise ValueError(f"a stride-{stride} map of {tuple(block.shape[-2:])} does not cover the grid {tuple(grid)}")
    return block[..., : grid[0], : grid[1]]
