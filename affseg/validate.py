"""In-training validation: single-scale val mIoU and pseudo-label quality on a fixed train subset.

Pseudo-label quality (SPEC §3), all with the same background rule:
`cam` = argmax over background + raw CAMs; `cam_par` = the same after PAR; `refined` = random walk
+ PAR, i.e. the training pseudo-labels.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from affseg.callbacks import ValidationResult
from affseg.data.transforms import denormalise
from affseg.data.voc import VocSegmentation
from affseg.figures import confusion_figure, overlay_figure
from affseg.engine.runtime import Runtime
from affseg.metrics import ConfusionMatrix
from affseg.method import PseudoLabeler, Student, Teacher
from affseg.slots import max_present

PSEUDO_KINDS = ("cam", "cam_par", "refined")
MAX_BATCH = 8
OVERLAY_IMAGES = 4


def batches_by_size(dataset: VocSegmentation, max_batch: int = MAX_BATCH) -> Iterator[dict]:
    """Consecutive items stacked while their image sizes agree (VOC images differ, demo ones don't)."""
    group: list[dict] = []
    for index in range(len(dataset)):
        item = dataset[index]
        if group and (item["image"].shape != group[0]["image"].shape or len(group) == max_batch):
            yield _stack(group)
            group = []
        group.append(item)
    if group:
        yield _stack(group)


def _stack(items: list[dict]) -> dict:
    return {
        "image": torch.stack([i["image"] for i in items]),
        "mask": torch.stack([i["mask"] for i in items]),
        "labels": torch.stack([i["labels"] for i in items]),
        "id": [i["id"] for i in items],
    }


@dataclass
class _Scores:
    """One head's running validation: its confusion matrices and overlay rows."""

    student: Student
    labeler: PseudoLabeler
    figure_dir: Path
    val: ConfusionMatrix
    pseudo: dict[str, ConfusionMatrix]
    overlays: list[dict[str, np.ndarray]] = field(default_factory=list)


def validate(teacher: Teacher, student: Student, labeler: PseudoLabeler, val_set: VocSegmentation,
             pseudo_set: VocSegmentation, iteration: int, runtime: Runtime, figure_dir: Path) -> ValidationResult:
    """Scores one student on `val_set` and its pseudo-labels on `pseudo_set`; writes two PNGs."""
    return validate_heads(teacher, [(student, labeler, figure_dir)], val_set, pseudo_set, iteration, runtime)[0]


def validate_heads(teacher: Teacher, heads: Sequence[tuple[Student, PseudoLabeler, Path]], val_set: VocSegmentation,
                   pseudo_set: VocSegmentation, iteration: int, runtime: Runtime) -> list[ValidationResult]:
    """Validate every (student, labeler, figure folder) of a group; one `ValidationResult` each, in order.

    The teacher runs once per image for all heads: its features alone on `val_set` (single scale, at
    the image's own size, as `Predictor.logits`); on `pseudo_set` one full pass serves every head's
    decoder prediction and its three pseudo-label variants (PAR's image kernel computed once)."""
    device = runtime.device
    scores = [_Scores(student, labeler, folder, ConfusionMatrix(device=device),
                      {kind: ConfusionMatrix(device=device) for kind in PSEUDO_KINDS}) for student, labeler, folder in heads]
    for score in scores:
        score.student.eval()
    for batch in batches_by_size(val_set):
        images, masks = batch["image"].to(device), batch["mask"].to(device)
        with runtime.autocast(), torch.no_grad():
            features = teacher.features(images)
            for score in scores:
                score.val.update(score.student(features, tuple(images.shape[-2:])).logits.float().argmax(1), masks)
    for batch in batches_by_size(pseudo_set):
        images, masks = batch["image"].to(device), batch["mask"].to(device)
        with runtime.autocast():
            taught = teacher(images, batch["labels"].to(device), slots=max_present(batch["labels"]))
            for score in scores:
                with torch.no_grad():
                    output = score.student(taught.features, images.shape[-2:])
                variants = score.labeler.variants(taught, output.aff_dec, iteration)
                for kind in PSEUDO_KINDS:
                    score.pseudo[kind].update(variants[kind], masks)
                _add_overlays(score.overlays, images, masks, variants, output.logits.argmax(1))
    for score in scores:
        score.student.train()
    return [_result(score, iteration) for score in scores]


def _add_overlays(overlays: list, images, masks, variants: dict, prediction) -> None:
    for b in range(min(len(images), OVERLAY_IMAGES - len(overlays))):
        picture = (denormalise(images[b : b + 1])[0].permute(1, 2, 0).cpu().numpy() * 255).astype(np.uint8)
        overlays.append({"image": picture, "truth": masks[b].cpu().numpy(),
                         **{k: variants[k][b].cpu().numpy() for k in PSEUDO_KINDS},
                         "decoder": prediction[b].cpu().numpy()})


def _result(score: _Scores, iteration: int) -> ValidationResult:
    summary = score.val.summary()
    score.figure_dir.mkdir(parents=True, exist_ok=True)
    figures = {"confusion.png": confusion_figure(summary.confusion, score.figure_dir / f"confusion_{iteration:06d}.png")}
    if score.overlays:
        figures["pseudo_labels.png"] = overlay_figure(score.overlays,
                                                      score.figure_dir / f"pseudo_labels_{iteration:06d}.png")
    return ValidationResult(
        iteration=iteration, miou=summary.miou, pixel_acc=summary.pixel_acc, mean_acc=summary.mean_acc,
        per_class=summary.per_class, confusion=summary.confusion,
        pseudo={kind: matrix.summary().miou for kind, matrix in score.pseudo.items()}, figures=figures,
    )
