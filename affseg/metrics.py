"""Segmentation metrics from one confusion matrix (VOC conventions)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from affseg.data.classes import NUM_CLASSES, VOC_CLASSES


class ConfusionMatrix:
    """Accumulates a (K, K) matrix, rows = truth, columns = prediction, on the tensors' device."""

    def __init__(self, num_classes: int = NUM_CLASSES, device: torch.device | str = "cpu"):
        self.num_classes = num_classes
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def update(self, prediction: torch.Tensor, truth: torch.Tensor) -> None:
        """prediction, truth: (B, H, W) or (H, W) integer class indices.

        A pixel counts only when both lie in [0, K): truth 255 is unlabelled, and a prediction of 255
        (a pseudo-label inside the ignore band, `refine.ignore_band`) is no class, so that pixel is
        left out of the matrix rather than scored as a class.
        """
        truth = truth.reshape(-1).to(self.matrix.device)
        prediction = prediction.reshape(-1).to(self.matrix.device)
        valid = (truth >= 0) & (truth < self.num_classes) & (prediction >= 0) & (prediction < self.num_classes)
        index = truth[valid].long() * self.num_classes + prediction[valid].long()
        self.matrix += torch.bincount(index, minlength=self.num_classes**2).view(self.num_classes, self.num_classes)

    def summary(self, class_names: tuple[str, ...] = VOC_CLASSES) -> "SegmentationScores":
        return scores_from_confusion(self.matrix.cpu().numpy(), class_names)


@dataclass
class SegmentationScores:
    """mIoU, pixel and mean accuracy (fractions in [0, 1]) and the per-class IoU table."""

    miou: float
    pixel_acc: float
    mean_acc: float
    per_class: pd.DataFrame  # columns: class, iou (NaN where a class is absent from truth and prediction)
    confusion: np.ndarray


def scores_from_confusion(matrix: np.ndarray, class_names: tuple[str, ...] = VOC_CLASSES) -> SegmentationScores:
    """Scores from a (K, K) confusion matrix.

    IoU_k = TP / (TP + FP + FN); a class absent from both truth and prediction is NaN and left
    out of the mean, as VOC does. Accuracy of a class absent from truth is NaN likewise.
    """
    matrix = np.asarray(matrix, dtype=np.float64)
    tp = np.diag(matrix)
    truth = matrix.sum(axis=1)
    predicted = matrix.sum(axis=0)
    union = truth + predicted - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
        class_acc = np.where(truth > 0, tp / truth, np.nan)
    total = matrix.sum()
    return SegmentationScores(
        miou=float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan"),
        pixel_acc=float(tp.sum() / total) if total > 0 else float("nan"),
        mean_acc=float(np.nanmean(class_acc)) if np.isfinite(class_acc).any() else float("nan"),
        per_class=pd.DataFrame({"class": list(class_names[: len(iou)]), "iou": iou}),
        confusion=matrix.astype(np.int64),
    )
