"""In-training validation: single-scale val mIoU and pseudo-label quality on a fixed train subset.

Pseudo-label quality (SPEC §3), all with the same background rule:
`cam` = argmax over background + raw CAMs; `cam_par` = the same after PAR; `refined` = random walk
+ PAR, i.e. the training pseudo-labels.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from affseg.callbacks import ValidationResult
from affseg.data.transforms import denormalise
from affseg.data.voc import VocSegmentation
from affseg.figures import confusion_figure, overlay_figure
from affseg.metrics import ConfusionMatrix
from affseg.engine.runtime import Runtime
from affseg.method import PseudoLabeler, Student, Teacher
from affseg.predict import Predictor

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


def validate(teacher: Teacher, student: Student, labeler: PseudoLabeler, val_set: VocSegmentation,
             pseudo_set: VocSegmentation, iteration: int, runtime: Runtime, figure_dir: Path) -> ValidationResult:
    """Scores the student on `val_set` and the pseudo-labels on `pseudo_set`; writes two PNGs.

    The teacher runs once per image: its features alone on `val_set` (the single-scale `Predictor.logits`
    at the image's own size); on `pseudo_set` one full pass serves the decoder prediction and all three
    pseudo-label variants (PAR once for `cam_par`, once for `refined`)."""
    student.eval()
    device = runtime.device
    val = ConfusionMatrix(device=device)
    overlays: list[dict[str, np.ndarray]] = []
    predictor = Predictor(teacher, student, runtime)
    for batch in batches_by_size(val_set):
        val.update(predictor.logits(batch["image"].to(device)).argmax(1), batch["mask"].to(device))
    pseudo = {kind: ConfusionMatrix(device=device) for kind in PSEUDO_KINDS}
    for batch in batches_by_size(pseudo_set):
        images, masks = batch["image"].to(device), batch["mask"].to(device)
        with runtime.autocast():
            taught = teacher(images, batch["labels"].to(device))
            with torch.no_grad():
                output = student(taught.features, images.shape[-2:])
            variants = labeler.variants(taught, output.aff_dec, iteration)
        prediction = output.logits.argmax(1)
        for kind in PSEUDO_KINDS:
            pseudo[kind].update(variants[kind], masks)
        for b in range(min(len(images), OVERLAY_IMAGES - len(overlays))):
            picture = (denormalise(images[b : b + 1])[0].permute(1, 2, 0).cpu().numpy() * 255).astype(np.uint8)
            overlays.append({"image": picture, "truth": masks[b].cpu().numpy(),
                             **{k: variants[k][b].cpu().numpy() for k in PSEUDO_KINDS},
                             "decoder": prediction[b].cpu().numpy()})
    student.train()
    scores = val.summary()
    figure_dir.mkdir(parents=True, exist_ok=True)
    figures = {"confusion.png": confusion_figure(scores.confusion, figure_dir / f"confusion_{iteration:06d}.png")}
    if overlays:
        figures["pseudo_labels.png"] = overlay_figure(overlays, figure_dir / f"pseudo_labels_{iteration:06d}.png")
    return ValidationResult(
        iteration=iteration, miou=scores.miou, pixel_acc=scores.pixel_acc, mean_acc=scores.mean_acc,
        per_class=scores.per_class, confusion=scores.confusion,
        pseudo={kind: pseudo[kind].summary().miou for kind in PSEUDO_KINDS}, figures=figures,
    )
