"""PNG figures for tracking: confusion matrix and pseudo-label overlays (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from affseg.data.classes import IGNORE_INDEX, VOC_CLASSES, voc_palette  # noqa: E402

PALETTE = np.array(voc_palette(), np.uint8).reshape(256, 3)


def colourise(mask: np.ndarray) -> np.ndarray:
    """(H, W) class indices (255 = ignore) → (H, W, 3) uint8 VOC colours (ignore is white)."""
    rgb = PALETTE[mask.astype(np.int64) % 256].copy()
    rgb[mask == IGNORE_INDEX] = 255
    return rgb


def confusion_figure(confusion: np.ndarray, path: Path, class_names=VOC_CLASSES) -> Path:
    """Row-normalised confusion matrix (truth rows) of the classes that occur, as a heat map."""
    used = (confusion.sum(0) + confusion.sum(1)) > 0
    matrix = confusion[np.ix_(used, used)].astype(np.float64)
    matrix = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
    names = [n for n, u in zip(class_names, used) if u]
    fig, ax = plt.subplots(figsize=(1.0 + 0.45 * len(names), 0.8 + 0.45 * len(names)))
    ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set_xlabel("prediction")
    ax.set_ylabel("truth")
    for (row, col), value in np.ndenumerate(matrix):
        ax.text(col, row, f"{value:.2f}", ha="center", va="center", fontsize=6, color="w" if value < 0.5 else "k")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def overlay_figure(rows: list[dict[str, np.ndarray]], path: Path) -> Path:
    """One row per image; each dict maps a column title to an (H, W, 3) image or (H, W) mask."""
    columns = list(rows[0])
    fig, axes = plt.subplots(len(rows), len(columns), figsize=(2 * len(columns), 2 * len(rows)), squeeze=False)
    for r, row in enumerate(rows):
        for c, title in enumerate(columns):
            value = row[title]
            axes[r, c].imshow(value if value.ndim == 3 else colourise(value))
            axes[r, c].axis("off")
            if r == 0:
                axes[r, c].set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
