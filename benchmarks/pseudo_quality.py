"""Pseudo-label quality (mIoU %) of raw CAMs, CAM+PAR and the refinement, for several refinement settings.

Uses the untrained-decoder phase (before `refine_start`: R = mean of the last encoder affinities),
so no training is needed: it isolates what the encoder affinities, the random walk and PAR add.

    python benchmarks/pseudo_quality.py [--root DIR] [--images 48] [--set refine.alpha=3 ...]
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from affseg.config import load_config, packaged_config  # noqa: E402
from affseg.data.voc import VocSegmentation  # noqa: E402
from affseg.metrics import ConfusionMatrix  # noqa: E402
from affseg.method import build_pseudo_labeler, build_student, build_teacher  # noqa: E402
from affseg.validate import PSEUDO_KINDS, batches_by_size  # noqa: E402

SETTINGS = {
    "default (α=2, box on output, bg power 1)": [],
    "α=1": ["refine.alpha=1"],
    "α=3": ["refine.alpha=3"],
    "α=4": ["refine.alpha=4"],
    "box on source": ["refine.box_mask=source"],
    "box threshold 0.2": ["refine.box_threshold=0.2"],
    "bg power 2": ["refine.bg_power=2.0"],
    "bg constant 0.45": ["refine.background=constant", "refine.bg_score=0.45"],
}


def score(config, dataset) -> dict[str, float]:
    teacher = build_teacher(config).eval()
    student, labeler = build_student(config, teacher).eval(), build_pseudo_labeler(config)
    matrices = {kind: ConfusionMatrix() for kind in PSEUDO_KINDS}
    for batch in batches_by_size(dataset):
        taught = teacher(batch["image"], batch["labels"])
        with torch.no_grad():
            aff_dec = student(taught.features, batch["image"].shape[-2:]).aff_dec
        variants = labeler.variants(taught, aff_dec, iteration=0)
        for kind in PSEUDO_KINDS:
            matrices[kind].update(variants[kind], batch["mask"])
    return {kind: 100 * m.summary().miou for kind, m in matrices.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="data/demo/VOCdevkit/VOC2012")
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--set", nargs="*", default=[], help="extra overrides applied to every row")
    args = parser.parse_args()
    torch.manual_seed(0)
    base = [f"data.root={args.root}", *args.set]
    config = load_config(packaged_config("demo"), base)
    dataset = VocSegmentation(config.data.root, config.data.train_split, None, config.data.cls_labels,
                              limit=args.images)
    print(f"| setting ({args.images} train images) | cam | cam_par | refined |\n|---|---|---|---|")
    for name, overrides in SETTINGS.items():
        result = score(load_config(packaged_config("demo"), base + overrides), dataset)
        print(f"| {name} | {result['cam']:.1f} | {result['cam_par']:.1f} | {result['refined']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
