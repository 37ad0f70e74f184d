"""`affseg prepare-voc`: build SegmentationClassAug, train_aug.txt and cls labels; check the layout.

SBD (`benchmark_RELEASE/dataset`: cls/<id>.mat, train.txt, val.txt) masks are converted
into SegmentationClassAug; VOC's own SegmentationClass masks win where both exist.
train_aug = (SBD train ∪ SBD val ∪ VOC train) − VOC val (10,582 ids for the real data).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from affseg.data.classes import voc_palette
from affseg.data.voc import (
    CLS_LABELS_FILE,
    MASK_DIR,
    VocLayout,
    labels_from_mask,
    read_ids,
    read_image,
    read_mask,
)

VOC_OWN_MASK_DIR = "SegmentationClass"
LABELLED_SPLITS = ("train_aug", "train", "val")


@dataclass
class PrepareReport:
    """What prepare-voc did and every file it could not use."""

    root: Path
    converted_sbd: int = 0
    copied_voc: int = 0
    split_sizes: dict[str, int] = field(default_factory=dict)
    labelled: int = 0
    problems: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"prepared {self.root}"]
        out += [f"  {name}: {size} ids" for name, size in self.split_sizes.items()]
        out.append(f"  masks: {self.converted_sbd} converted from SBD, {self.copied_voc} copied from VOC")
        out.append(f"  image-level labels: {self.labelled} ids -> {CLS_LABELS_FILE}")
        out.append(f"  problems: {len(self.problems)}")
        out += [f"    {problem}" for problem in self.problems]
        return out


def _sbd_dir(sbd: Path) -> Path:
    """Accept `benchmark_RELEASE`, its `dataset` folder, or the folder holding cls/."""
    for candidate in (sbd, sbd / "dataset", sbd / "benchmark_RELEASE" / "dataset"):
        if (candidate / "cls").is_dir():
            return candidate
    raise FileNotFoundError(f"{sbd}: no SBD cls/ folder found (expected benchmark_RELEASE/dataset/cls/*.mat)")


def read_sbd_mask(path: Path) -> np.ndarray:
    """(H, W) uint8 from an SBD `GTcls` .mat file."""
    from scipy.io import loadmat

    data = loadmat(str(path), squeeze_me=True, struct_as_record=False)
    return np.asarray(data["GTcls"].Segmentation, dtype=np.uint8)


def _write_mask(mask: np.ndarray, path: Path) -> None:
    png = Image.fromarray(mask, mode="P")
    png.putpalette(voc_palette())
    png.save(path)


def _split_ids(path: Path) -> list[str]:
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def _build_masks(layout: VocLayout, sbd: Path | None, report: PrepareReport) -> list[str]:
    """Fill SegmentationClassAug; return SBD train ∪ val ids (empty without SBD)."""
    out_dir = layout.root / MASK_DIR
    out_dir.mkdir(exist_ok=True)
    own_dir = layout.root / VOC_OWN_MASK_DIR
    if own_dir.is_dir():
        for png in sorted(own_dir.glob("*.png")):
            try:
                _write_mask(read_mask(png), out_dir / png.name)
                report.copied_voc += 1
            except OSError as err:
                report.problems.append(str(err))
    if sbd is None:
        return []
    sbd_root = _sbd_dir(sbd)
    sbd_ids = _split_ids(sbd_root / "train.txt") + _split_ids(sbd_root / "val.txt")
    for image_id in sbd_ids:
        target = out_dir / f"{image_id}.png"
        if (own_dir / f"{image_id}.png").is_file():
            continue  # VOC's own mask wins
        try:
            _write_mask(read_sbd_mask(sbd_root / "cls" / f"{image_id}.mat"), target)
            report.converted_sbd += 1
        except (OSError, KeyError, ValueError, AttributeError) as err:
            report.problems.append(f"{sbd_root / 'cls' / (image_id + '.mat')}: unreadable SBD mask ({type(err).__name__})")
    return sbd_ids


def prepare_voc(root: str | Path, sbd: str | Path | None = None) -> PrepareReport:
    """Build masks, train_aug.txt and cls_labels_onehot.npy under `root`; report every unusable file."""
    layout = VocLayout(Path(root))
    layout.check_exists()
    report = PrepareReport(root=layout.root)
    sbd_ids = _build_masks(layout, Path(sbd) if sbd else None, report)
    split_dir = layout.split("train").parent
    voc_val = set(_split_ids(split_dir / "val.txt"))
    if sbd_ids or not layout.split("train_aug").is_file():
        voc_train = _split_ids(split_dir / "train.txt")
        merged = sorted(set(sbd_ids) | set(voc_train), key=lambda i: i)
        train_aug = [i for i in merged if i not in voc_val]
        layout.split("train_aug").write_text("\n".join(train_aug) + "\n")

    labels: dict[str, np.ndarray] = {}
    for split in (*LABELLED_SPLITS, "test"):
        if not layout.split(split).is_file():
            if split in ("train_aug", "val"):
                report.problems.append(f"{layout.split(split)}: split list missing")
            continue
        ids = read_ids(layout, split)
        report.split_sizes[split] = len(ids)
        for image_id in ids:
            try:
                read_image(layout.image(image_id))
            except OSError as err:
                report.problems.append(str(err))
                continue
            if split == "test" or image_id in labels:
                continue
            mask_path = layout.mask(image_id)
            if not mask_path.is_file():
                report.problems.append(f"{mask_path}: mask missing")
                continue
            try:
                labels[image_id] = labels_from_mask(read_mask(mask_path))
            except OSError as err:
                report.problems.append(str(err))
    np.save(layout.root / CLS_LABELS_FILE, labels, allow_pickle=True)
    report.labelled = len(labels)
    return report
