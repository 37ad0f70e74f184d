"""Training augmentation and evaluation loading (SPEC §3).

Images travel as float tensors normalised with ImageNet mean/std (UniCL's own
preprocessing); masks as int64 with IGNORE_INDEX where no label exists (crop
padding included). A training crop also carries its validity mask: True on image pixels, False on the
padding that random crop added (SPEC §5.1: padding is ignored everywhere).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from affseg.data.classes import IGNORE_INDEX

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalise(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 → (3, H, W) float32 ImageNet-normalised."""
    tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (tensor - mean) / std


def denormalise(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) normalised → (B, 3, H, W) in [0, 1]."""
    mean = images.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = images.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images * std + mean).clamp(0.0, 1.0)


@dataclass(frozen=True)
class TrainAugment:
    """Random rescale, random crop (padding = ignore / zero), horizontal flip, normalisation."""

    crop_size: int = 224
    scale_min: float = 0.5
    scale_max: float = 2.0
    flip_prob: float = 0.5

    def __call__(
        self, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(H, W, 3) uint8, (H, W) uint8 → image (3, S, S) float, mask (S, S) int64, valid (S, S) bool,
        with S = crop_size; valid is False on the crop's padding."""
        scale = rng.uniform(self.scale_min, self.scale_max)
        height, width = mask.shape
        new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
        img = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()
        img = F.interpolate(img, size=(new_h, new_w), mode="bilinear", align_corners=False)[0]
        msk = torch.from_numpy(np.ascontiguousarray(mask))[None, None].float()
        msk = F.interpolate(msk, size=(new_h, new_w), mode="nearest")[0, 0].long()
        if rng.random() < self.flip_prob:
            img, msk = img.flip(-1), msk.flip(-1)
        size = self.crop_size
        pad_h, pad_w = max(size - new_h, 0), max(size - new_w, 0)
        mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1) * 255.0
        canvas = mean.expand(3, new_h + pad_h, new_w + pad_w).clone()  # pad with the mean → 0 after normalising
        canvas[:, :new_h, :new_w] = img
        labels = torch.full((new_h + pad_h, new_w + pad_w), IGNORE_INDEX, dtype=torch.long)
        labels[:new_h, :new_w] = msk
        valid = torch.zeros(labels.shape, dtype=torch.bool)
        valid[:new_h, :new_w] = True
        top = int(rng.integers(0, canvas.shape[1] - size + 1))
        left = int(rng.integers(0, canvas.shape[2] - size + 1))
        canvas = canvas[:, top : top + size, left : left + size]
        labels = labels[top : top + size, left : left + size]
        valid = valid[top : top + size, left : left + size]
        std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
        tensor = (canvas / 255.0 - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / std
        return tensor.contiguous(), labels.contiguous(), valid.contiguous()
