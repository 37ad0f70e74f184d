"""Transition matrix, box masks and random-walk propagation (SPEC §2.4 steps 5–6).

Orientation: maps are column vectors over the N = h·w grid cells (row-major), and
one walk step is M ← T M, i.e. M_new[i] = Σ_j T[i, j] M[j]; j is the source cell.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

BoxMode = Literal["output", "source"]
BoxClip = Literal["inclusive", "reference"]

QUANT_LEVELS = 255  # `reference` box clipping thresholds the CAM quantised to uint8 (×255), ...
REFERENCE_SCALE_EPS = 1e-7  # ... scaled first as pytorch-grad-cam's scale_cam_image does, x / (max + 1e-7),
REFERENCE_SCALINGS = 2  # ... twice, as WeCLIP's Grad-CAM does (per layer, then the mean over layers)

SUM_FLOOR = 1e-12  # a row/column of R summing to 0 is divided by this instead (stays 0)
SPARE_ROUNDS = 2  # connected components: rounds on top of ⌈log2(h·w)⌉ (see `component_rounds`)


def sinkhorn(affinity: Tensor, iters: int = 3) -> Tensor:
    """Sinkhorn normalisation: `iters` rounds of (columns, then rows) to sum 1.

    affinity: (B, N, N) non-negative. Returns R_nor (B, N, N): rows sum to 1 up to
    rounding (the last step), columns only approximately.
    """
    out = affinity
    for _ in range(iters):
        out = out / out.sum(dim=-2, keepdim=True).clamp(min=SUM_FLOOR)
        out = out / out.sum(dim=-1, keepdim=True).clamp(min=SUM_FLOOR)
    return out


def transition_matrix(affinity: Tensor, iters: int = 3) -> Tensor:
    """T = (R_nor + R_norᵀ) / 2 — exactly symmetric, rows sum ≈ 1; no renormalisation.

    affinity: (B, N, N) → (B, N, N).
    """
    normalised = sinkhorn(affinity, iters)
    return (normalised + normalised.transpose(-2, -1)) / 2


def component_rounds(height: int, width: int) -> int:
    """The fixed round budget of `_component_labels` on an h×w grid: ⌈log2(h·w)⌉ + `SPARE_ROUNDS`.

    Hooking plus shortcutting halves the longest label chain about every round: random masks, blurred
    blobs and snakes (one path through the whole grid) of 14×14, 28×28 and 56×56 reached the fixed
    point within 5, 6 and 8 rounds (snakes the slowest), under budgets of 10, 12 and 14."""
    return math.ceil(math.log2(max(2, height * width))) + SPARE_ROUNDS


def _neighbourhood_max(labels: Tensor, height: int, width: int) -> Tensor:
    """The 3×3 maximum of (M, h·w) labels laid out on an h×w grid → (M, h·w)."""
    maps = labels.shape[0]
    return F.max_pool2d(labels.view(maps, 1, height, width), kernel_size=3, stride=1, padding=1).view(maps, -1)


def _component_labels(mask: Tensor) -> tuple[Tensor, Tensor]:
    """8-connected components of (M, h, w) bool masks in a fixed number of rounds (no host sync).

    A label-propagation version of Shiloach–Vishkin's hooking and shortcutting (as in FastSV). Each active
    cell's label starts as its flat index (inactive cells hold 0, which never wins a maximum, and are reset
    to 0 every round); a label always names a cell of the labelled cell's component. A round takes the 3×3
    maximum of the labels (`nb`), hooks: the cell a label names takes the largest `nb` of the cells that
    name it, then every cell takes max(own, nb), and shortcuts: a cell takes the label of the cell its label
    names when that is larger. At the fixed point every cell of a component holds the component's largest
    flat index. Returns (labels (M, h, w) long: 1 + that index, 0 outside the mask; converged () bool,
    whether the fixed point was reached within `component_rounds`). Unconverged, a component's cells carry
    several labels: their boxes lie inside the component's box and still cover every cell. Labels are
    float32 while they run (exact below 2^24 cells).
    """
    maps, height, width = mask.shape
    keep = mask.to(torch.float32).view(maps, -1)
    labels = torch.arange(height * width, device=mask.device, dtype=torch.float32) * keep  # (M, h·w)
    for _ in range(component_rounds(height, width)):
        nb = _neighbourhood_max(labels, height, width) * keep
        hooked = labels.scatter_reduce(1, labels.long(), nb, reduce="amax").maximum(nb)
        labels = hooked.maximum(hooked.gather(1, hooked.long())) * keep
    converged = (_neighbourhood_max(labels, height, width) * keep == labels).all()
    return ((labels + 1) * keep).view(maps, height, width).long(), converged


def _active_cells(flat: Tensor, threshold: float, clip: BoxClip) -> Tensor:
    """Cells strictly above `threshold · max` of their map. flat: (M, h, w) → (M, h, w) bool.

    `reference` first scales each map like the reference, x / (max + 1e-7) twice (our maps are
    min-max normalised already: min 0, max 1; the reference's peak becomes 1 − 1.2e-7, so its uint8
    peak is 254, not 255, and the threshold int(0.4 · 254) = 101), then quantises like its
    `(cam * 255).astype(uint8)` (truncation toward zero for values in [0, 1]; clamped so values
    outside stay defined) and compares with `threshold · max` of the quantised map; cv2's
    `q > int(t)` equals `q > t` for integer q.
    """
    if clip == "reference":
        for _ in range(REFERENCE_SCALINGS):
            flat = flat / (flat.flatten(1).amax(dim=1).view(-1, 1, 1) + REFERENCE_SCALE_EPS)
        flat = (flat.clamp(0, 1) * QUANT_LEVELS).to(torch.uint8).to(torch.float64)
    elif clip != "inclusive":
        raise ValueError(f"unknown box clip {clip!r}; choose inclusive or reference")
    peak = flat.flatten(1).amax(dim=1).view(-1, 1, 1)
    return (flat > threshold * peak) & (peak > 0)


def box_masks(cams: Tensor, threshold: float, clip: BoxClip = "inclusive") -> Tensor:
    """Union of the bounding rectangles of each map's high-activation regions.

    cams: (B, K, h, w). A cell is active when cam > threshold · max of its map;
    active cells form 8-connected regions; each region's bounding rectangle is set,
    and the rectangles are OR-ed. `inclusive`: the rectangle keeps its last row and
    column (at the border too). `reference` (SPEC §5.1): the exclusive end is clipped
    to w−1/h−1 and filled exclusively, so the last row/column is never included, and
    the CAM is quantised to uint8 first. A map with no positive value (an absent class)
    has no active cell, hence no box. Returns (B, K, h, w) bool.
    """
    return checked_box_masks(cams, threshold, clip)[0]


def checked_box_masks(cams: Tensor, threshold: float, clip: BoxClip = "inclusive") -> tuple[Tensor, Tensor]:
    """`box_masks` and whether its connected components converged (() bool, on the device: read it when
    the host reads anyway). Every map is computed, so nothing depends on a value read back."""
    batch, classes, height, width = cams.shape
    active = _active_cells(cams.reshape(batch * classes, height, width), threshold, clip)
    boxes, converged = _union_of_boxes(active, clip)
    return boxes.view(batch, classes, height, width), converged


def _union_of_boxes(active: Tensor, clip: BoxClip) -> tuple[Tensor, Tensor]:
    """(M, h, w) bool active cells → ((M, h, w) bool union of their regions' rectangles, converged)."""
    height, width = active.shape[-2:]
    labels, converged = _component_labels(active)
    labels = labels.flatten(1)  # (M, N), 0 = none

    maps, cells = labels.shape
    rows = torch.arange(height, device=active.device).repeat_interleave(width).expand(maps, cells)
    cols = torch.arange(width, device=active.device).repeat(height).expand(maps, cells)
    slots = cells + 1  # one slot per possible label, slot 0 collects inactive cells

    def reduce(values: Tensor, how: str, start: int) -> Tensor:
        out = torch.full((maps, slots), start, dtype=torch.long, device=active.device)
        return out.scatter_reduce(1, labels, values, reduce=how, include_self=True)

    top, bottom = reduce(rows, "amin", height), reduce(rows, "amax", -1)
    left, right = reduce(cols, "amin", width), reduce(cols, "amax", -1)
    real = bottom >= 0
    real[:, 0] = False
    if clip == "reference":  # exclusive end min(last + 1, size − 1): last kept index ≤ size − 2
        bottom, right = bottom.clamp(max=height - 2), right.clamp(max=width - 2)
        real &= (bottom >= top) & (right >= left)

    # 2-D difference array: +1 at the top-left corner of each rectangle, −1 just past its
    # right and bottom edges, +1 past both; its 2-D prefix sum counts covering rectangles.
    stride = width + 1
    top, bottom, left, right = (t.clamp(min=0) for t in (top, bottom, left, right))
    below = (bottom + 1) * stride
    corners = torch.cat([top * stride + left, top * stride + right + 1, below + left, below + right + 1], dim=1)
    signs = torch.tensor([1, -1, -1, 1], device=active.device).repeat_interleave(slots)
    weights = signs * real.repeat(1, 4)  # (M, 4·slots); unused slots add nothing
    diff = torch.zeros(maps, (height + 1) * stride, dtype=torch.long, device=active.device)
    diff.scatter_add_(1, corners, weights)
    cover = diff.view(maps, height + 1, width + 1).cumsum(dim=1).cumsum(dim=2)
    return cover[:, :height, :width] > 0, converged


def random_walk(transition: Tensor, cams: Tensor, alpha: int, boxes: Tensor, mode: BoxMode = "output") -> Tensor:
    """Propagate CAMs α steps over T and restrict them to their box (eq. 3.16).

    transition: (B, N, N); cams, boxes: (B, K, h, w) with N = h·w; alpha ≥ 1.
    - output: M_f = B ⊙ (T^α M_init) (the paper's equation).
    - source: M_f = T^α (B ⊙ M_init), i.e. column j of T^α is zeroed for every
      source cell j outside the box (the reference code); cells outside the
      box may receive mass.
    T^α is never formed: M is multiplied by T α times (same result, K ≪ N).
    Returns (B, K, h, w).
    """
    if alpha < 1:
        raise ValueError(f"alpha must be an integer >= 1, got {alpha}")
    batch, classes, height, width = cams.shape
    box = boxes.to(cams.dtype).reshape(batch, classes, -1).transpose(1, 2)  # (B, N, K)
    walked = cams.reshape(batch, classes, -1).transpose(1, 2)  # (B, N, K)
    if mode == "source":
        walked = walked * box
    elif mode != "output":
        raise ValueError(f"unknown box mode {mode!r}; choose output or source")
    for _ in range(alpha):
        walked = transition @ walked
    if mode == "output":
        walked = walked * box
    return walked.transpose(1, 2).reshape(batch, classes, height, width)
