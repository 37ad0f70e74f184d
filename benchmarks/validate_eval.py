"""Validation and evaluation time per image, before and after the one inference path (issue 10 item 7).

Not a test; prints one markdown table. Random weights (`model.checkpoint=random`) on a demo set of
square S×S images, `eval.long_side` = S, scales 1.0/0.75 + flip, decoder at its default size.

- before: the previous commit's paths, kept here on the new modules. Validation ran a second encoder
  forward per pseudo-subset image for the decoder prediction (`model.predict`); evaluation decoded each
  image twice (dataset item + `read_image`) and ran one batch-1 forward per scale and per flip.
- after: `affseg.validate.validate` (one encoder forward per image) and `affseg.evaluate.evaluate`
  (`Predictor`: each scale one forward with its mirror, a DataLoader with `data.num_workers` workers).

ms per validation image = one validate call / (val images + pseudo-subset images);
ms per evaluated image = one evaluate call / evaluated images. After a warm-up forward the four calls
run `--repeats` times interleaved and the fastest of each is shown (the CPU is shared); before and after
must give the same mIoU.

    OMP_NUM_THREADS=1 python benchmarks/validate_eval.py [--device cpu] [--workers 0] [--cases tiny:224:4 ...]
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import math  # noqa: E402
import tempfile  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from affseg.config import Config, load_config  # noqa: E402
from affseg.data.demo import DemoSpec, make_demo  # noqa: E402
from affseg.data.transforms import denormalise, normalise  # noqa: E402
from affseg.data.voc import VocSegmentation, read_image  # noqa: E402
from affseg.engine.runtime import Runtime  # noqa: E402
from affseg.evaluate import TrainedModel, evaluate  # noqa: E402
from affseg.figures import confusion_figure, overlay_figure  # noqa: E402
from affseg.method import (  # noqa: E402
    PseudoLabeler, Student, Teacher, build_pseudo_labeler, build_student, build_teacher,
)
from affseg.metrics import ConfusionMatrix  # noqa: E402
from affseg.validate import OVERLAY_IMAGES, PSEUDO_KINDS, batches_by_size, validate  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_predict import reference_probs  # noqa: E402  (the evaluation loop before the Predictor: the test's reference)

ENCODERS = {"tiny": "unicl_swin_tiny", "swin_b": "unicl_swin_b"}
# encoder:size:images (images per set: val, pseudo subset and evaluation each); Swin-B at 512 is slow on CPU
DEFAULT_CASES = ["tiny:224:4", "tiny:512:2", "swin_b:224:2", "swin_b:512:1"]
SCORE_TOLERANCE = 1e-4  # before and after must score alike
MS = 1e3


def _resize(tensor: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(tensor, size=size, mode="bilinear", align_corners=False)


def reference_evaluate(trained: TrainedModel, limit: int) -> float:
    """The previous `evaluate` (no CRF): each image decoded twice, per-view forwards; returns the mIoU."""
    config = trained.config
    dataset = VocSegmentation(config.data.root, "val", None, config.data.cls_labels, limit=limit)
    confusion = ConfusionMatrix()
    for index in range(len(dataset)):
        item = dataset[index]
        image = read_image(dataset.layout.image(item["id"]))
        probs = reference_probs(trained.teacher, trained.student, normalise(image)[None].to(trained.device),
                                config.eval)
        confusion.update(probs.argmax(0).cpu().to(torch.uint8), item["mask"])
    return confusion.summary().miou


def reference_validate(teacher: Teacher, student: Student, labeler: PseudoLabeler, val_set: VocSegmentation,
                       pseudo_set: VocSegmentation, runtime: Runtime, figure_dir: Path) -> float:
    """The previous validation: the pseudo-subset prediction ran its own encoder forward
    (`model.predict`); same figures; returns the val mIoU."""
    student.eval()
    device = runtime.device
    val = ConfusionMatrix(device=device)
    overlays: list[dict[str, np.ndarray]] = []
    for batch in batches_by_size(val_set):
        images = batch["image"].to(device)
        with runtime.autocast(), torch.no_grad():
            logits = student(teacher.features(images), images.shape[-2:]).logits
        val.update(logits.argmax(1), batch["mask"].to(device))
    pseudo = {kind: ConfusionMatrix(device=device) for kind in PSEUDO_KINDS}
    for batch in batches_by_size(pseudo_set):
        images, masks = batch["image"].to(device), batch["mask"].to(device)
        with runtime.autocast():
            taught = teacher(images, batch["labels"].to(device))
            with torch.no_grad():
                aff_dec = student(taught.features, images.shape[-2:]).aff_dec
                variants = labeler.variants(taught, aff_dec, 0)
                prediction = student(teacher.features(images), images.shape[-2:]).logits.argmax(1)
        for kind in PSEUDO_KINDS:
            pseudo[kind].update(variants[kind], masks)
        for b in range(min(len(images), OVERLAY_IMAGES - len(overlays))):
            picture = (denormalise(images[b : b + 1])[0].permute(1, 2, 0).cpu().numpy() * 255).astype(np.uint8)
            overlays.append({"image": picture, "truth": masks[b].cpu().numpy(),
                             **{k: variants[k][b].cpu().numpy() for k in PSEUDO_KINDS},
                             "decoder": prediction[b].cpu().numpy()})
    scores = val.summary()
    figure_dir.mkdir(parents=True, exist_ok=True)
    confusion_figure(scores.confusion, figure_dir / "confusion_before.png")
    if overlays:
        overlay_figure(overlays, figure_dir / "pseudo_labels_before.png")
    return scores.miou


def _config(root: Path, out: Path, encoder: str, size: int, images: int, device: str, workers: int) -> Config:
    return load_config(None, [
        f"data.root={root}", "data.demo=false", f"data.val_limit={images}", f"data.pseudo_subset={images}",
        f"data.num_workers={workers}", f"model.encoder={encoder}", "model.checkpoint=random",
        f"eval.long_side={size}", f"train.device={device}", f"train.out_dir={out}",
    ])


def _timed(call: Callable[[], float]) -> tuple[float, float]:
    """(seconds, result) of `call()`, CUDA-synchronised."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = call()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, result


def run_case(name: str, size: int, images: int, device: str, workers: int, repeats: int,
             work: Path) -> dict[str, float]:
    """ms per validation image and per evaluated image, before and after, for one encoder and size."""
    root = make_demo(work / f"demo_{size}_{images}", DemoSpec(seed=0, train=images, val=images, test=1, size=size))
    config = _config(root, work / "out", ENCODERS[name], size, images, device, workers)
    runtime = Runtime.create(config.train.device, config.train.amp)
    torch.manual_seed(config.train.seed)
    teacher = build_teacher(config, runtime.device).eval()
    student, labeler = build_student(config, teacher).eval(), build_pseudo_labeler(config)
    data = config.data
    val_set = VocSegmentation(data.root, data.val_split, None, data.cls_labels, limit=data.val_limit)
    pseudo_set = VocSegmentation(data.root, data.train_split, None, data.cls_labels, limit=data.pseudo_subset)
    trained = TrainedModel(teacher, student, config, runtime.device)
    trained.logits(torch.zeros(1, 3, size, size, device=runtime.device))  # warm-up

    paths = {
        "val_before": lambda: reference_validate(teacher, student, labeler, val_set, pseudo_set, runtime,
                                                 work / "figures"),
        "val_after": lambda: validate(teacher, student, labeler, val_set, pseudo_set, 0, runtime,
                                      work / "figures").miou,
        "eval_before": lambda: reference_evaluate(trained, images),
        "eval_after": lambda: evaluate(trained, "val", limit=images).miou,
    }
    seconds: dict[str, list[float]] = {key: [] for key in paths}
    scores: dict[str, float] = {}
    for _ in range(repeats):  # interleaved, the minimum kept: the CPU is shared
        for key, call in paths.items():
            student.eval()  # validate() leaves the student training
            elapsed, scores[key] = _timed(call)
            seconds[key].append(elapsed)
    for kind in ("val", "eval"):
        if not math.isclose(scores[f"{kind}_before"], scores[f"{kind}_after"], abs_tol=SCORE_TOLERANCE):
            raise RuntimeError(f"{name} {size}: {kind} mIoU before {scores[f'{kind}_before']} "
                               f"!= after {scores[f'{kind}_after']}")
    counts = {"val": len(val_set) + len(pseudo_set), "eval": images}
    row = {key: MS * min(times) / counts[key.split("_")[0]] for key, times in seconds.items()}
    return {**row, "validated": counts["val"], "evaluated": counts["eval"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    parser.add_argument("--workers", type=int, default=0, help="data.num_workers of evaluation")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each path (the minimum is shown)")
    parser.add_argument("--cases", nargs="*", default=DEFAULT_CASES, help="encoder:size:images, encoder in "
                        f"{sorted(ENCODERS)}")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, device {args.device}, CPU threads {torch.get_num_threads()}, "
          f"eval workers {args.workers}\n")
    print("| encoder | size | images (val+pseudo / eval) | validate ms/img before | after | "
          "evaluate ms/img before | after |")
    print("|---|---:|---|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for case in args.cases:
            name, size, images = case.split(":")
            row = run_case(name, int(size), int(images), args.device, args.workers, args.repeats, Path(tmp))
            print(f"| {name} | {size} | {row['validated']} / {row['evaluated']} | {row['val_before']:.0f} | "
                  f"{row['val_after']:.0f} | {row['eval_before']:.0f} | {row['eval_after']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
