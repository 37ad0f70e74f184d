"""PASCAL VOC 2012 (+ SBD) layout: image lists, masks, image-level labels, datasets.

Layout under `root` (a `VOCdevkit/VOC2012` folder):
    JPEGImages/<id>.jpg
    SegmentationClassAug/<id>.png          index (or palette) PNG, 255 = ignore
    ImageSets/Segmentation/{train_aug,train,val,test}.txt
    cls_labels_onehot.npy                  pickled dict id → float32[20] (WeCLIP's format)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from affseg.data.classes import IGNORE_INDEX, NUM_FOREGROUND
from affseg.data.cls_labels import LabelFileError, read_label_dict
from affseg.data.transforms import TrainAugment, normalise

log = logging.getLogger(__name__)

IMAGE_DIR = "JPEGImages"
MASK_DIR = "SegmentationClassAug"
SPLIT_DIR = "ImageSets/Segmentation"
CLS_LABELS_FILE = "cls_labels_onehot.npy"


class DatasetError(RuntimeError):
    """The dataset folder is missing or malformed; the message says which file and what to do."""


@dataclass(frozen=True)
class VocLayout:
    """Paths of one VOC2012 folder."""

    root: Path

    def image(self, image_id: str) -> Path:
        return self.root / IMAGE_DIR / f"{image_id}.jpg"

    def mask(self, image_id: str) -> Path:
        return self.root / MASK_DIR / f"{image_id}.png"

    def split(self, name: str) -> Path:
        return self.root / SPLIT_DIR / f"{name}.txt"

    def check_exists(self) -> None:
        if not self.root.is_dir():
            raise DatasetError(
                f"{self.root}: dataset folder not found; point data.root at VOCdevkit/VOC2012 "
                "(or run `affseg make-demo` / `affseg prepare-voc`)"
            )
        for sub in (IMAGE_DIR, SPLIT_DIR):
            if not (self.root / sub).is_dir():
                raise DatasetError(f"{self.root / sub}: missing; is data.root a VOCdevkit/VOC2012 folder?")


def read_ids(layout: VocLayout, split: str) -> list[str]:
    """Image ids listed in `ImageSets/Segmentation/<split>.txt`."""
    path = layout.split(split)
    if not path.is_file():
        raise DatasetError(f"{path}: split list not found; run `affseg prepare-voc --root {layout.root}`")
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


def load_cls_labels(path: Path) -> dict[str, np.ndarray]:
    """Read the id → float32[20] dict written by `np.save` (or plain pickle), never running its code."""
    if not path.is_file():
        raise DatasetError(f"{path}: image-level labels not found; run `affseg prepare-voc --root {path.parent}`")
    try:
        return read_label_dict(path)
    except (OSError, LabelFileError) as err:
        raise DatasetError(f"{path}: unusable image-level labels ({err}); rebuild with `affseg prepare-voc`") from None


def read_image(path: Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB; raises OSError naming the file when it is missing or corrupt."""
    try:
        with Image.open(path) as image:
            return np.array(image.convert("RGB"))
    except (FileNotFoundError, UnidentifiedImageError, OSError, SyntaxError) as err:
        raise OSError(f"{path}: unreadable image ({type(err).__name__})") from None


def read_mask(path: Path) -> np.ndarray:
    """(H, W) uint8 class indices (palette PNGs are read as indices)."""
    try:
        with Image.open(path) as mask:
            if mask.mode not in ("P", "L"):
                raise OSError(f"{path}: mask must be an index or palette PNG, got mode {mask.mode}")
            return np.array(mask)
    except (FileNotFoundError, UnidentifiedImageError, SyntaxError) as err:
        raise OSError(f"{path}: unreadable mask ({type(err).__name__})") from None


def labels_from_mask(mask: np.ndarray) -> np.ndarray:
    """float32[20] multi-hot of the foreground classes present in a (H, W) mask."""
    present = np.unique(mask)
    present = present[(present > 0) & (present != IGNORE_INDEX)]
    onehot = np.zeros(NUM_FOREGROUND, np.float32)
    onehot[present.astype(np.int64) - 1] = 1.0
    return onehot


class VocSegmentation(Dataset):
    """One split of a VOC-layout folder.

    Items are dicts: `image` (3, H, W) float normalised, `mask` (H, W) int64 (255 ignore),
    `valid` (H, W) bool (False on crop padding; all True without augmentation), `labels` (20,) float multi-hot, `id` str, `index` int. With `augment`, images are
    random-rescaled, cropped and flipped (H = W = crop size); without, original size.
    An unreadable file is reported once and replaced by the next readable item.
    """

    def __init__(self, root: str | Path, split: str, augment: TrainAugment | None = None,
                 cls_labels: str = CLS_LABELS_FILE, limit: int = 0, seed: int = 0):
        self.layout = VocLayout(Path(root))
        self.layout.check_exists()
        self.ids = read_ids(self.layout, split)
        if limit > 0:
            self.ids = self.ids[:limit]
        if not self.ids:
            raise DatasetError(f"{self.layout.split(split)}: split list is empty")
        self.split = split
        self.labels = load_cls_labels(self.layout.root / cls_labels)
        missing = [i for i in self.ids if i not in self.labels]
        if missing and split != "test":
            raise DatasetError(
                f"{self.layout.root / cls_labels}: no labels for {len(missing)} ids of {split} "
                f"(first: {missing[0]}); rebuild with `affseg prepare-voc`"
            )
        self.augment = augment
        self.seed = seed
        self.epoch = 0
        self.bad_ids: set[str] = set()

    def __len__(self) -> int:
        return len(self.ids)

    def set_epoch(self, epoch: int) -> None:
        """Augmentation randomness is a function of (seed, epoch, index): resumable and worker-independent."""
        self.epoch = epoch

    def _load(self, index: int, rng_key: tuple) -> dict:
        image_id = self.ids[index]
        image = read_image(self.layout.image(image_id))
        mask_path = self.layout.mask(image_id)
        if mask_path.is_file():
            mask = read_mask(mask_path)
        elif self.split == "test":
            mask = np.full(image.shape[:2], IGNORE_INDEX, np.uint8)
        else:
            raise OSError(f"{mask_path}: mask not found")
        if mask.shape != image.shape[:2]:
            raise OSError(f"{mask_path}: mask size {mask.shape} differs from image {image.shape[:2]}")
        labels = self.labels.get(image_id, np.zeros(NUM_FOREGROUND, np.float32))
        if self.augment is not None:
            tensor, target, valid = self.augment(image, mask, np.random.default_rng(rng_key))
        else:
            tensor, target = normalise(image), torch.from_numpy(mask.astype(np.int64))
            valid = torch.ones(target.shape, dtype=torch.bool)
        return {"image": tensor, "mask": target, "valid": valid,
                "labels": torch.from_numpy(np.asarray(labels, np.float32)), "id": image_id, "index": index}

    def __getitem__(self, index: int) -> dict:
        return self.get(index, (self.seed, self.epoch, index))

    def get(self, index: int, rng_key: tuple) -> dict:
        """Item `index` with augmentation seeded by `rng_key`; an unreadable one is skipped."""
        for offset in range(len(self.ids)):
            candidate = (index + offset) % len(self.ids)
            try:
                return self._load(candidate, rng_key)
            except OSError as err:
                if self.ids[candidate] not in self.bad_ids:
                    self.bad_ids.add(self.ids[candidate])
                    log.warning("skipping %s", err)
        raise DatasetError(f"{self.layout.root}: no readable image in split {self.split}")
