"""`affseg evaluate`: multi-scale + flip inference (long side 512, `affseg.predict.Predictor`), optional
dense CRF, per-class table, VOC palette PNG export (the test split has no masks: export only)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from affseg.config import Config, from_dict
from affseg.data.classes import voc_palette
from affseg.data.voc import VocSegmentation
from affseg.engine.checkpoint import load_checkpoint
from affseg.engine.runtime import Runtime, amp_dtype, select_device
from affseg.method import Student, Teacher, build_student, build_teacher
from affseg.metrics import ConfusionMatrix, SegmentationScores
from affseg.predict import Predictor

EVAL_BATCH = 1  # VOC images differ in size; multi-scale + flip batches each image with its mirror


@dataclass
class TrainedModel:
    """A decoder checkpoint loaded into its student, the teacher it was trained on, and their config."""

    teacher: Teacher
    student: Student
    config: Config
    device: torch.device

    def predictor(self) -> Predictor:
        """Multi-scale inference with the checkpoint's `eval` settings, under its `train.amp`."""
        runtime = Runtime(self.device, amp_dtype(self.device, self.config.train.amp))
        return Predictor(self.teacher, self.student, runtime, self.config.eval)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Decoder logits (B, 21, H, W) for normalised images (B, 3, H, W), at their own size."""
        return self.predictor().logits(images)


def load_trained(checkpoint: str | Path, device: str = "auto", encoder_checkpoint: str | None = None) -> TrainedModel:
    """Model + decoder weights from a training checkpoint; `encoder_checkpoint` overrides the saved path."""
    state = load_checkpoint(checkpoint)
    config = from_dict(state["config"])
    if encoder_checkpoint is not None:
        config.model.checkpoint = encoder_checkpoint
    torch_device = select_device(device)
    # `model.checkpoint=random` (tests, benchmarks): draw the encoder training drew, which the
    # Trainer builds right after torch.manual_seed(train.seed); the caller's RNG stays untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.train.seed)
        teacher = build_teacher(config, torch_device)
        student = build_student(config, teacher)
    student.decoder.load_state_dict(state["decoder"])
    return TrainedModel(teacher.eval(), student.eval(), config, torch_device)


def load_predictor(checkpoint: str | Path, device: str = "auto", encoder_checkpoint: str | None = None) -> Predictor:
    """The `Predictor` of a training checkpoint, as served by the promoted pyfunc model."""
    return load_trained(checkpoint, device, encoder_checkpoint).predictor()


def format_scores(scores: SegmentationScores) -> str:
    """The per-class IoU table (%) and the summary line, as printed by `affseg evaluate`."""
    table = scores.per_class.assign(iou=lambda d: (100 * d.iou).round(1)).to_string(index=False)
    summary = f"mIoU {100 * scores.miou:.1f}  pAcc {100 * scores.pixel_acc:.1f}  mAcc {100 * scores.mean_acc:.1f}"
    return f"{table}\n{summary}"


def save_palette_png(mask: np.ndarray, path: Path) -> None:
    png = Image.fromarray(mask.astype(np.uint8), mode="P")
    png.putpalette(voc_palette())
    png.save(path)


def evaluate(trained: TrainedModel, split: str = "val", crf: bool | None = None, export: str | Path | None = None,
             limit: int = 0) -> SegmentationScores | None:
    """Score `split` (None for the unlabelled test split); export palette PNGs to `export` if given.

    `crf=None` follows `eval.crf` of the checkpoint's config."""
    config = trained.config
    dataset = VocSegmentation(config.data.root, split, None, config.data.cls_labels, limit=limit)
    export_dir = Path(export) if export else None
    if export_dir:
        export_dir.mkdir(parents=True, exist_ok=True)
    confusion = ConfusionMatrix()
    labelled = split != "test"
    predictor = trained.predictor()
    loader = DataLoader(dataset, batch_size=EVAL_BATCH, num_workers=config.data.num_workers,
                        pin_memory=trained.device.type == "cuda")
    for batch in loader:  # each image decoded once, in `data.num_workers` workers
        masks = predictor.masks(batch["image"].to(trained.device, non_blocking=True), crf)
        for mask, truth, image_id in zip(masks, batch["mask"], batch["id"]):
            if labelled:
                confusion.update(torch.from_numpy(mask), truth)
            if export_dir:
                save_palette_png(mask, export_dir / f"{image_id}.png")
    return confusion.summary() if labelled else None
