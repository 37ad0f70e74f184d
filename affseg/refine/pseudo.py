"""From CAMs to pseudo-labels: affinity refinement chain, background, PAR, argmax (SPEC §2.4)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from affseg.cam import minmax_normalise
from affseg.config import RefineConfig
from affseg.data.classes import BACKGROUND_INDEX, IGNORE_INDEX
from affseg.grid import grid_to_pixels, grid_validity
from affseg.refine.affinity import combine_affinities, select_layers
from affseg.refine.par import ParKernel, par
from affseg.refine.random_walk import checked_box_masks, random_walk, transition_matrix
from affseg.slots import max_present, present_first


@torch.no_grad()
def refine_cams(
    cams: Tensor, aff_enc: Tensor, aff_dec: Tensor | None, cfg: RefineConfig, cells: Tensor | None = None
) -> Tensor:
    """`checked_refine_cams` without its convergence flag."""
    return checked_refine_cams(cams, aff_enc, aff_dec, cfg, cells)[0]


@torch.no_grad()
def checked_refine_cams(
    cams: Tensor, aff_enc: Tensor, aff_dec: Tensor | None, cfg: RefineConfig, cells: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Affinity random walk of the CAMs (§2.4 steps 3–6), and whether the box masks' connected
    components converged (() bool on the device, `checked_box_masks`).

    cams: (B, K_fg, h, w) raw CAMs (absent classes 0); aff_enc: (B, L, N, N) encoder
    affinities in block order; aff_dec: (B, N, N) decoder affinity, or None before
    `refine_start` (then R = mean of the last `warmup_blocks` encoder affinities).
    Otherwise the candidates are the last `n0`, filtered by `select_layers` and
    weighted by A_f (detached). cells: (B, h, w) bool, the image part of padded crops
    (None = all; SPEC §5.1): the CAMs are zeroed outside it, so every box lies in the
    (rectangular) image part, and the encoder affinities are restricted to pairs of
    image cells, so R, Sinkhorn and the walk never see padding (A_f need not be: R is
    a product with them, and padding pairs add the same amount to every layer score).
    Returns ((B, K_fg, h, w) maps, absent classes and padding cells 0; converged).
    """
    if cells is not None:
        cams = cams * cells[:, None]
        inside = cells.flatten(1)
        aff_enc = aff_enc * (inside[:, :, None] & inside[:, None, :]).to(aff_enc.dtype)[:, None]
    if aff_dec is None:
        affinity = combine_affinities(None, aff_enc[:, -cfg.warmup_blocks :])
    else:
        aff_dec = aff_dec.detach()
        candidates = aff_enc[:, -cfg.n0 :]
        keep = select_layers(aff_dec, candidates, cfg.deviation)
        affinity = combine_affinities(aff_dec, candidates, keep)
    transition = transition_matrix(affinity, cfg.sinkhorn_iters)
    boxes, converged = checked_box_masks(cams, cfg.box_threshold, cfg.box_clip)
    return random_walk(transition, cams, cfg.alpha, boxes, cfg.box_mask), converged


def add_background(fg: Tensor, cfg: RefineConfig) -> Tensor:
    """Prepend a background map to foreground scores in [0, 1].

    fg: (B, K, H, W) → (B, 1 + K, H, W), background first.
    `power`: bg = (1 − max_c fg_c)^bg_power; `constant`: bg = bg_score everywhere.
    """
    if cfg.background == "power":
        background = (1 - fg.amax(dim=1, keepdim=True)).clamp(min=0).pow(cfg.bg_power)
    elif cfg.background == "constant":
        background = torch.full_like(fg[:, :1], cfg.bg_score)
    else:
        raise ValueError(f"unknown background mode {cfg.background!r}; choose power or constant")
    return torch.cat([background, fg], dim=1)


@dataclass
class LabelScores:
    """Pixel scores of background + present slots before PAR, with what turns them into labels.

    scores: (B, 1 + S, H, W), background first; classes: (B, S) long, the VOC foreground class of each
    slot; in_use: (B, S) bool, slots past an image's present count are padding (their scores are 0)."""

    scores: Tensor
    classes: Tensor
    in_use: Tensor


@torch.no_grad()
def label_scores(fg_maps: Tensor, labels: Tensor, size: tuple[int, int], cfg: RefineConfig,
                 valid: Tensor | None = None, slots: int | None = None) -> LabelScores:
    """`pseudo_labels` up to PAR: present maps packed into slots, min-max normalised, upsampled to `size`
    (H, W), background prepended."""
    cells = None if valid is None else grid_validity(valid, fg_maps.shape[-2:])
    slots = max_present(labels) if slots is None else slots
    classes, in_use = present_first(labels, max(1, slots))  # (B, S)
    grid = fg_maps.gather(1, classes[:, :, None, None].expand(-1, -1, *fg_maps.shape[-2:]))
    grid = minmax_normalise(grid, cells=cells) * in_use[:, :, None, None]
    fg = grid_to_pixels(grid, size)  # SPEC §5.1: padded extent, then crop
    return LabelScores(add_background(fg, cfg), classes, in_use)


@torch.no_grad()
def labels_from_scores(scored: LabelScores, cfg: RefineConfig, refined_by_par: bool,
                       valid: Tensor | None = None) -> Tensor:
    """`pseudo_labels` after PAR: argmax over background + present slots, ignore band, crop padding.
    refined_by_par: whether `scored.scores` went through PAR (their growth is divided out for the band)."""
    scores, classes, in_use = scored.scores, scored.classes, scored.in_use
    allowed = torch.cat([torch.ones_like(in_use[:, :1]), in_use], dim=1)[:, :, None, None]
    slot = scores.masked_fill(~allowed, float("-inf")).argmax(dim=1)  # (B, H, W), 0 = background
    fg_index = classes.gather(1, (slot.flatten(1) - 1).clamp(min=0)).view_as(slot) + 1
    result = torch.where(slot == 0, torch.full_like(slot, BACKGROUND_INDEX), fg_index)

    if cfg.ignore_band:
        fg_scores = scores[:, 1:]  # slots past an image's present count are exactly 0 (× in_use above)
        if refined_by_par:
            fg_scores = fg_scores / (1 + cfg.par.w2) ** cfg.par.iterations
        best = fg_scores.amax(dim=1)
        band = (best >= cfg.low_threshold) & (best < cfg.high_threshold)
        result = result.masked_fill(band, IGNORE_INDEX)
    return result if valid is None else result.masked_fill(~valid, IGNORE_INDEX)


@torch.no_grad()
def pseudo_labels(
    fg_maps: Tensor, labels: Tensor, images: Tensor, cfg: RefineConfig, use_par: bool, valid: Tensor | None = None,
    par_kernel: ParKernel | None = None, slots: int | None = None,
) -> Tensor:
    """Pixel labels in VOC index space (0 = background, c + 1 = foreground class c).

    fg_maps: (B, K_fg, h, w) grid scores; labels: (B, K_fg) {0, 1}; images: (B, 3, H, W)
    the normalised input. Present maps are min-max normalised (absent ones are never
    looked at), upsampled bilinearly to H×W, a background map is prepended, PAR runs on
    background + present maps when `use_par` (training passes `cfg.par.enabled`), and
    the argmax runs over background + present classes only (`label_scores`, PAR,
    `labels_from_scores`).

    Ignore band (`cfg.ignore_band`): a pixel whose best foreground score lies in
    [low_threshold, high_threshold) becomes IGNORE_INDEX. After PAR the scores are
    divided by PAR's growth (1 + w2)^iterations so the thresholds keep their [0, 1] scale.

    valid: (B, H, W) bool, False on crop padding (None = all image): the min-max runs
    over the image cells only and padding pixels become IGNORE_INDEX (SPEC §5.1).
    par_kernel: PAR's `image_kernel` of `images` under `cfg.par`, when the caller has it already.
    slots: the largest present-class count of an image (`affseg.slots.max_present` of the CPU labels;
    None = read from `labels`, a host sync on a GPU); the maps are packed to max(1, slots) slots.
    Returns (B, H, W) long.
    """
    scored = label_scores(fg_maps, labels, tuple(images.shape[-2:]), cfg, valid, slots)
    if use_par:
        p = cfg.par
        scored.scores = par(images, scored.scores, p.dilations, p.iterations, p.w1, p.w2, p.scale, kernel=par_kernel)
    return labels_from_scores(scored, cfg, refined_by_par=use_par, valid=valid)
