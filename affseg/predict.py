"""One inference path: the student on the teacher's features, shared by validation, `affseg evaluate` and
the promoted model.

`logits` is one forward at the images' own size (the encoder pads to a multiple of 16 itself, the decoder
crops its grid back to H × W: SPEC §5.1). `probs` resizes the long side to `eval.long_side` keeping the
exact aspect ratio, runs each scale as ONE forward with its mirror in the same batch, averages the logits
at the long-side size, softmaxes and resizes to H × W. `masks` takes the argmax, or the dense CRF's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from affseg.config import EvalConfig
from affseg.crf import dense_crf
from affseg.data.classes import NUM_CLASSES
from affseg.data.transforms import denormalise, normalise
from affseg.engine.runtime import Runtime
from affseg.method import Student, Teacher

MAX_VALUE = 255  # uint8 pixels
PREDICT_BATCH = 8  # images per `predict` chunk (each scale forwards twice as many with flip)


def resize(images: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear (B, C, h, w) → (B, C, *size), align_corners=False."""
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False)


def long_side_size(size: tuple[int, int], long_side: int) -> tuple[int, int]:
    """(H, W) with its long side brought to `long_side`, the short one rounded: 333×500 at 512 → 341×512."""
    height, width = size
    factor = long_side / max(height, width)
    return round(height * factor), round(width * factor)


def scaled_size(size: tuple[int, int], scale: float) -> tuple[int, int]:
    """(H, W) · scale, each side rounded and at least 1 (the exact aspect ratio, no multiple-of-32 snap)."""
    return tuple(max(1, round(side * scale)) for side in size)


def pixels_of(images: Tensor) -> np.ndarray:
    """ImageNet-normalised (B, 3, H, W) → (B, H, W, 3) uint8 RGB: exactly the pixels `normalise` was given
    (float32 keeps each of the 256 levels within 1e-3 of its integer), so the CRF needs no second decode."""
    pixels = (denormalise(images.float()) * MAX_VALUE).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).cpu().numpy()


@dataclass
class Predictor:
    """The frozen teacher's features → the student's decoder, under the runtime's autocast.

    settings: scales, flip, long side and CRF of multi-scale inference (`logits` ignores them).
    """

    teacher: Teacher
    student: Student
    runtime: Runtime
    settings: EvalConfig = field(default_factory=EvalConfig)

    @torch.no_grad()
    def logits(self, images: Tensor) -> Tensor:
        """Normalised (B, 3, H, W) → float32 decoder logits (B, 21, H, W): one encoder forward."""
        with self.runtime.autocast():
            return self.student(self.teacher.features(images), tuple(images.shape[-2:])).logits.float()

    @torch.no_grad()
    def probs(self, images: Tensor) -> Tensor:
        """Normalised (B, 3, H, W) of one size → class probabilities (B, 21, H, W), multi-scale (+ flip)."""
        batch, size = images.shape[0], tuple(images.shape[-2:])
        target = long_side_size(size, self.settings.long_side)
        total = torch.zeros(batch, NUM_CLASSES, *target, device=images.device)
        for scale in self.settings.scales:
            scaled = resize(images, scaled_size(target, scale))
            if self.settings.flip:  # the view and its mirror in one forward
                both = self.logits(torch.cat([scaled, scaled.flip(-1)]))
                logits = both[:batch] + both[batch:].flip(-1)
            else:
                logits = self.logits(scaled)
            total += resize(logits, target)
        views = len(self.settings.scales) * (2 if self.settings.flip else 1)
        return resize(torch.softmax(total / views, dim=1), size)

    def masks(self, images: Tensor, crf: bool | None = None) -> np.ndarray:
        """Normalised (B, 3, H, W) → (B, H, W) uint8 VOC class indices; `crf` None follows `settings.crf`."""
        probs = self.probs(images)
        if not (self.settings.crf if crf is None else crf):
            return probs.argmax(1).to(torch.uint8).cpu().numpy()
        scores = probs.cpu().numpy()
        return np.stack([dense_crf(pixels, score, self.settings).argmax(0).astype(np.uint8)
                         for pixels, score in zip(pixels_of(images), scores)])

    def predict(self, images: np.ndarray, crf: bool | None = None) -> np.ndarray:
        """(N, H, W, 3) uint8 RGB → (N, H, W) uint8 class indices, `PREDICT_BATCH` images per batch."""
        chunks = [self.masks(torch.stack([normalise(image) for image in images[start : start + PREDICT_BATCH]])
                             .to(self.runtime.device), crf)
                  for start in range(0, len(images), PREDICT_BATCH)]
        return np.concatenate(chunks) if chunks else np.zeros(images.shape[:3], np.uint8)
