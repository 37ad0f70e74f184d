"""Class activation maps from a frozen vision-language encoder (SPEC §2.2).

The text features of the class prompts act as the classifier head: logits =
exp(logit_scale) · cos(image embedding, text features) over the 20 foreground
classes plus the background prompts. The CAM of a present class c is taken at
one encoder block (the "CAM block", stride 16) from the gradient of the softmax
probability of c, absent foreground classes being masked out of the softmax.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, Protocol

import torch
from torch import Tensor

from affseg.backbones.base import autocast_off
from affseg.config import ConfigError
from affseg.slots import max_present, slot_masks

CamMethod = Literal["gradcam", "gradcampp", "layercam"]

NORMALISE_EPS = 1e-5  # smallest value range a map is divided by in min-max normalisation
GRADCAMPP_EPS = 1e-7  # keeps the Grad-CAM++ alpha denominator away from 0


class CamEncoder(Protocol):
    """The part of `DualEncoder` that CAMs need."""

    def encode_image(self, images: Tensor, grad_block: int | None = None) -> Any:
        """Returns `ImageFeatures` (`blocks`, `block_strides`, `embedding`)."""


class CamClassifier(Protocol):
    """The part of `ZeroShotClassifier` that CAMs need."""

    num_foreground: int

    def logits(self, image_embedding: Tensor) -> Tensor:
        """(B, D) → (B, K_fg + K_bg) scaled cosine similarities."""


def cam_from_gradients(acts: Tensor, grads: Tensor, method: CamMethod = "gradcam") -> Tensor:
    """One CAM per image from a block's activations and the gradient of a class score.

    acts, grads: (B, C, h, w). Returns (B, h, w), ReLU'd, not normalised.

    - gradcam: w_c = mean_xy(grad_c); CAM = ReLU(Σ_c w_c A_c).
    - gradcampp: the closed form of Grad-CAM++ (exp-score approximation):
      α_c,xy = g² / (2 g² + Σ_x'y' A_c,x'y' · g³) (0 where g = 0),
      w_c = Σ_xy α_c,xy · ReLU(g_c,xy); CAM = ReLU(Σ_c w_c A_c).
    - layercam: CAM = ReLU(Σ_c ReLU(g_c) ⊙ A_c).
    """
    if method == "gradcam":
        weights = grads.mean(dim=(2, 3), keepdim=True)
        cam = (weights * acts).sum(dim=1)
    elif method == "gradcampp":
        g2 = grads.pow(2)
        g3 = grads.pow(3)
        act_sum = acts.sum(dim=(2, 3), keepdim=True)
        alpha = g2 / (2 * g2 + act_sum * g3 + GRADCAMPP_EPS)
        alpha = torch.where(grads != 0, alpha, torch.zeros_like(alpha))
        weights = (alpha * grads.clamp(min=0)).sum(dim=(2, 3), keepdim=True)
        cam = (weights * acts).sum(dim=1)
    elif method == "layercam":
        cam = (grads.clamp(min=0) * acts).sum(dim=1)
    else:
        raise ValueError(f"unknown CAM method {method!r}; choose gradcam, gradcampp or layercam")
    return cam.clamp(min=0)


def minmax_normalise(cams: Tensor, eps: float = NORMALISE_EPS, cells: Tensor | None = None) -> Tensor:
    """Map every (h, w) map to [0, 1]: (x − min) / max(max − min, eps).

    cams: (B, K, h, w) → (B, K, h, w). A map whose range exceeds `eps` gets
    maximum exactly 1; a constant map becomes 0. `cells` (B, h, w) bool, optional:
    min and max are taken over those cells only (the image part of a padded crop,
    SPEC §5.1) and every other cell becomes 0.
    """
    flat = cams.flatten(2)
    if cells is None:
        low, high = flat.amin(dim=2, keepdim=True), flat.amax(dim=2, keepdim=True)
    else:
        inside = cells.flatten(1).unsqueeze(1)  # (B, 1, N)
        low = flat.masked_fill(~inside, float("inf")).amin(dim=2, keepdim=True)
        high = flat.masked_fill(~inside, float("-inf")).amax(dim=2, keepdim=True)
    span = (high - low).clamp(min=eps)
    out = (flat - low) / span
    return (out if cells is None else out * inside).view_as(cams)


def _check_gradient_reached(moved: Tensor, present: Tensor, num_background: int, cam_block: int) -> None:
    """Raise when no image got any Grad-CAM gradient although some softmax had a rival class.

    moved: (B,) bool, image received a non-zero gradient; present: (B, K_fg) bool. An image whose
    softmax holds a single class (one present class, no background prompts) has probability 1 and
    gradient 0 whatever the block, so it does not count.
    """
    rivalled = present.sum(dim=1) + num_background >= 2
    if bool(rivalled.any()) and not bool(moved[rivalled].any()):
        raise ConfigError(
            f"model.cam_block: the Grad-CAM gradient at encoder block {cam_block} is exactly 0 for the whole "
            "batch (the block does not reach the image embedding, e.g. the last block of a CLIP ViT); "
            "choose an earlier block, or leave model.cam_block unset for the encoder's default"
        )


def compute_cams(
    encoder: CamEncoder,
    classifier: CamClassifier,
    images: Tensor,
    labels: Tensor,
    cam_block: int,
    method: CamMethod = "gradcam",
    cells: Tensor | None = None,
    slots: int | None = None,
    check_gradient: bool = True,
) -> tuple[Tensor, Any]:
    """CAMs of every present class, batched over images, and the encoder features.

    images: (B, 3, H, W) normalised as the encoder expects; labels: (B, K_fg)
    float {0, 1}; cam_block: index into `features.blocks` of the target block
    (the caller maps the config's stride-16 index through `stage_blocks`); cells: (B, h, w)
    bool, the image part of padded crops (`affseg.grid.grid_validity`), or None for all; slots: the
    largest present-class count of an image (`affseg.slots.max_present` of the CPU labels; None = read
    from `labels`, a host sync on a GPU); check_gradient: whether to verify that the gradient reached
    the block (a host sync; whether a block reaches the embedding does not depend on the batch, so the
    teacher checks its first batch only).

    One forward pass with the target block as a grad leaf, then one batched backward
    over the present-class slots (`is_grads_batched`): slot s back-propagates the sum of
    the target probabilities of every image's (s+1)-th present class. Images do not
    interact in the encoder, so each image receives exactly its own class's gradient.

    Under autocast the blocks after the target (see `grad_mode`), the logits and the
    backward run in float32 (SPEC §5.1: fp16 flushes CAM gradients to zero).

    Returns (cams (B, K_fg, h, w) detached — absent classes exactly 0, present
    ones min-max normalised to [0, 1] over `cells`, 0 elsewhere — and the `ImageFeatures` with every block
    detached). With `check_gradient`, raises ConfigError when the whole batch's gradient at the target
    is exactly 0 (a block that does not reach the embedding), never silent background.
    """
    num_fg = labels.shape[1]
    if num_fg != classifier.num_foreground:
        raise ValueError(f"labels have {num_fg} classes but the classifier has {classifier.num_foreground}")
    present = labels > 0
    with torch.enable_grad():
        features = encoder.encode_image(images, grad_block=cam_block)  # blocks after the target: float32
        acts = features.blocks[cam_block]
        with autocast_off():  # the logits and their softmax in float32 too, whatever the autocast dtype
            logits = classifier.logits(features.embedding.float())
            # an image without any present class keeps its plain softmax (never a row of -inf only)
            absent = ~present & present.any(dim=1, keepdim=True)
            fg_logits = logits[:, :num_fg].masked_fill(absent, float("-inf"))
            probs = torch.cat([fg_logits, logits[:, num_fg:]], dim=1).softmax(dim=1)[:, :num_fg]

        masks = slot_masks(labels, max_present(labels) if slots is None else slots)  # (S, B, K_fg)
        batch, _, height, width = acts.shape
        cams = acts.new_zeros(batch, num_fg, height, width, dtype=torch.float32)
        if len(masks):
            # one batched backward: slot s back-propagates the probabilities its mask selects
            (grads,) = torch.autograd.grad(probs, acts, grad_outputs=masks.to(probs.dtype), is_grads_batched=True)
            detached = acts.detach().float()
            for mask, slot_grads in zip(masks, grads):
                cam = cam_from_gradients(detached, slot_grads.float(), method)  # (B, h, w)
                cams = cams + mask[:, :, None, None] * cam[:, None]
            if check_gradient:
                moved = grads.flatten(2).ne(0).any(dim=2).any(dim=0)  # (B,): the image got a non-zero gradient
                _check_gradient_reached(moved, present, logits.shape[1] - num_fg, cam_block)

    cams = minmax_normalise(cams, cells=cells)  # absent maps were never written: still exactly 0
    blocks = [block.detach() for block in features.blocks]
    features = dataclasses.replace(features, blocks=blocks, embedding=features.embedding.detach())
    return cams.detach(), features
