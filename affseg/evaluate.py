"""`affseg evaluate`: multi-scale + flip inference (long side 512), optional dense CRF, per-class table,
VOC palette PNG export (the test split has no masks: export only)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from affseg.config import Config, EvalConfig, from_dict
from affseg.crf import dense_crf
from affseg.data.classes import voc_palette
from affseg.data.transforms import normalise
from affseg.data.voc import VocSegmentation, read_image
from affseg.metrics import ConfusionMatrix, SegmentationScores
from affseg.engine.checkpoint import load_checkpoint
from affseg.engine.runtime import select_device
from affseg.method import Student, Teacher, build_student, build_teacher



@dataclass
class TrainedModel:
    """A decoder checkpoint loaded into its student, the teacher it was trained on, and their config."""

    teacher: Teacher
    student: Student
    config: Config
    device: torch.device

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Decoder logits (B, 21, H, W) for normalised images (B, 3, H, W)."""
        return self.student(self.teacher.features(images), images.shape[-2:]).logits


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


def _resize(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False)


@torch.no_grad()
def predict_probs(trained: TrainedModel, image: torch.Tensor, cfg: EvalConfig) -> torch.Tensor:
    """image (1, 3, H, W) normalised → class probabilities (21, H, W).

    The long side is resized to `cfg.long_side`; logits at each scale (and its flip) are resized
    back to that size and averaged, then softmaxed and resized to H × W.
    """
    height, width = image.shape[-2:]
    base = cfg.long_side / max(height, width)
    target = (round(height * base), round(width * base))
    total = torch.zeros(1, 21, *target, device=image.device)
    count = 0
    for scale in cfg.scales:
        size = tuple(max(1, round(side * scale)) for side in target)  # the exact aspect ratio (SPEC §5.1)
        scaled = _resize(image, size)
        views = [scaled, scaled.flip(-1)] if cfg.flip else [scaled]
        for index, view in enumerate(views):
            logits = trained.logits(view).float()
            if index == 1:
                logits = logits.flip(-1)
            total += _resize(logits, target)
            count += 1
    probs = torch.softmax(total / count, dim=1)
    return _resize(probs, (height, width))[0]


def predict_mask(trained: TrainedModel, image: np.ndarray, crf: bool | None = None) -> np.ndarray:
    """(H, W, 3) uint8 RGB → (H, W) uint8 VOC class indices."""
    tensor = normalise(image)[None].to(trained.device)
    probs = predict_probs(trained, tensor, trained.config.eval)
    use_crf = trained.config.eval.crf if crf is None else crf
    if use_crf:
        return dense_crf(image, probs.cpu().numpy(), trained.config.eval).argmax(0).astype(np.uint8)
    return probs.argmax(0).cpu().numpy().astype(np.uint8)


def load_predictor(checkpoint: str | Path, device: str = "auto", encoder_checkpoint: str | None = None):
    """A callable image (H, W, 3) uint8 → mask (H, W) uint8, as served by the promoted pyfunc model."""
    trained = load_trained(checkpoint, device, encoder_checkpoint)
    return lambda image: predict_mask(trained, image)


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
    for index in range(len(dataset)):
        item = dataset[index]
        image = read_image(dataset.layout.image(item["id"]))
        mask = predict_mask(trained, image, crf)
        if labelled:
            confusion.update(torch.from_numpy(mask), item["mask"])
        if export_dir:
            save_palette_png(mask, export_dir / f"{item['id']}.png")
    return confusion.summary() if labelled else None
