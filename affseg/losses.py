"""L = L_seg + λ L_aff (SPEC §2.5, eqs. 3.19–3.22)."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from affseg.config import LossConfig
from affseg.data.classes import BACKGROUND_INDEX, IGNORE_INDEX
from affseg.grid import pixels_to_grid

SegLoss = Literal["balanced", "plain"]
AffLoss = Literal["linear", "bce"]

PROB_EPS = 1e-6  # BCE clamps affinities to [eps, 1 − eps]


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of `values` over `mask`; 0 (still in the graph) when the mask is empty."""
    return (values * mask).sum() / mask.sum().clamp(min=1)


def segmentation_loss(logits: Tensor, target: Tensor, mode: SegLoss = "balanced") -> Tensor:
    """Cross-entropy of the decoder's prediction against the pseudo-labels.

    logits: (B, C, H, W); target: (B, H, W) long, IGNORE_INDEX ignored. Returns a scalar.
    - plain: mean CE over non-ignored pixels.
    - balanced: 0.5 · mean CE over background pixels + 0.5 · mean CE over foreground
      pixels. Guard: when one set is empty, the other gets weight 1; when both are
      (all ignored) the loss is 0, still connected to `logits` for backward.
    """
    losses = F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX, reduction="none")
    valid = target != IGNORE_INDEX
    if mode == "plain":
        return _masked_mean(losses, valid)
    if mode != "balanced":
        raise ValueError(f"unknown segmentation loss {mode!r}; choose balanced or plain")
    background = target == BACKGROUND_INDEX
    foreground = valid & ~background
    has_bg = background.any().to(losses.dtype)
    has_fg = foreground.any().to(losses.dtype)
    total = has_bg * _masked_mean(losses, background) + has_fg * _masked_mean(losses, foreground)
    return total / (has_bg + has_fg).clamp(min=1)


def radius_mask(grid: tuple[int, int], radius: int, device: torch.device | None = None) -> Tensor:
    """(N, N) bool: cells i, j with |Δrow| ≤ radius and |Δcol| ≤ radius (Chebyshev), i = j included."""
    height, width = grid
    rows = torch.arange(height, device=device).repeat_interleave(width)
    cols = torch.arange(width, device=device).repeat(height)
    near_rows = (rows[:, None] - rows[None, :]).abs() <= radius
    near_cols = (cols[:, None] - cols[None, :]).abs() <= radius
    return near_rows & near_cols


def affinity_labels(pseudo: Tensor, grid: tuple[int, int], radius: int) -> tuple[Tensor, Tensor]:
    """Same-label / different-label pairs of the pseudo-label on the h×w grid (eq. 3.20).

    pseudo: (B, H, W) long, IGNORE_INDEX ignored; it is sampled onto `grid` (the
    first pixel of each cell, `affseg.grid.pixels_to_grid`). A pair (i, j) counts only when both cells carry a label and
    lie within `radius` cells (Chebyshev distance). The pair i = j is kept (a
    positive: A_p(i, i) = 1 by eq. 3.20).
    Returns (positive (B, N, N) bool, negative (B, N, N) bool).
    """
    small = pixels_to_grid(pseudo, grid).flatten(1)  # (B, N), SPEC §5.1 grid rule
    valid = small != IGNORE_INDEX
    pairs = valid[:, :, None] & valid[:, None, :] & radius_mask(grid, radius, pseudo.device)
    same = small[:, :, None] == small[:, None, :]
    return pairs & same, pairs & ~same


def affinity_loss(
    aff_dec: Tensor, pseudo: Tensor, grid: tuple[int, int], radius: int, mode: AffLoss = "linear"
) -> Tensor:
    """Train A_f towards the pseudo-label's pair labels (eq. 3.21).

    aff_dec: (B, N, N) in (0, 1); pseudo: (B, H, W). Returns a scalar.
    - linear: 0.5 · mean(1 − A_f) over positive pairs + 0.5 · mean(A_f) over negative pairs.
    - bce: 0.5 · mean(−log A_f) over positives + 0.5 · mean(−log(1 − A_f)) over negatives,
      A_f clamped to [PROB_EPS, 1 − PROB_EPS].
    An empty set contributes 0 to its half (means are over the whole batch's pairs).
    """
    positive, negative = affinity_labels(pseudo, grid, radius)
    if mode == "linear":
        pos_loss, neg_loss = 1 - aff_dec, aff_dec
    elif mode == "bce":
        prob = aff_dec.clamp(PROB_EPS, 1 - PROB_EPS)
        pos_loss, neg_loss = -prob.log(), -(1 - prob).log()
    else:
        raise ValueError(f"unknown affinity loss {mode!r}; choose linear or bce")
    return 0.5 * _masked_mean(pos_loss, positive) + 0.5 * _masked_mean(neg_loss, negative)


def total_loss(seg: Tensor, aff: Tensor, lam: float) -> Tensor:
    """L = L_seg + λ · L_aff (eq. 3.19)."""
    return seg + lam * aff


def method_losses(logits: Tensor, aff_dec: Tensor, target: Tensor, grid: tuple[int, int], cfg: LossConfig) -> dict:
    """`loss` = L_seg + λ·L_aff, with both parts (scalars, float32 whatever the autocast dtype).

    logits (B, 21, H, W); aff_dec (B, N, N); target (B, H, W) pseudo-labels (or ground truth); grid (h, w)."""
    seg = segmentation_loss(logits.float(), target, cfg.seg)
    aff = affinity_loss(aff_dec.float(), target, grid, cfg.aff_radius, cfg.aff)
    return {"loss": total_loss(seg, aff, cfg.lam), "loss/seg": seg, "loss/aff": aff}
