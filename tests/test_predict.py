"""The one inference path (`affseg.predict.Predictor`, issue 10): batched scales and flips equal the old
per-view loop, the CRF sees the exact pixels, and validation runs the encoder once per image."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_train import tiny_config

import affseg.method.labeler as labeler_module
import affseg.predict as predict_module
import affseg.refine.pseudo as pseudo_module
from affseg.config import EvalConfig
from affseg.crf import dense_crf
from affseg.data.classes import NUM_CLASSES
from affseg.data.transforms import normalise
from affseg.engine.runtime import Runtime
from affseg.engine.trainer import Trainer
from affseg.predict import Predictor, pixels_of
from affseg.validate import validate

TOLERANCE = 1e-5  # issue 10: batched inference equals the per-view loop
LONG_SIDE = 120  # small and not a multiple of 16: the encoder pads, the decoder crops
SIZE = (70, 95)  # → long side (88, 120); scale 0.75 → (66, 90)
SCALES = [1.0, 0.75]


def _resize(tensor: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(tensor, size=size, mode="bilinear", align_corners=False)


@torch.no_grad()
@torch.no_grad()
def reference_probs(teacher, student, image: torch.Tensor, cfg: EvalConfig) -> torch.Tensor:
    """The loop before the Predictor: (1, 3, H, W) → (21, H, W), one batch-1 forward per scale and flip
    (also the "before" path of benchmarks/validate_eval.py)."""
    height, width = image.shape[-2:]
    base = cfg.long_side / max(height, width)
    target = (round(height * base), round(width * base))
    total = torch.zeros(1, 21, *target, device=image.device)
    count = 0
    for scale in cfg.scales:
        scaled = _resize(image, tuple(max(1, round(side * scale)) for side in target))
        views = [scaled, scaled.flip(-1)] if cfg.flip else [scaled]
        for index, view in enumerate(views):
            logits = student(teacher.features(view), view.shape[-2:]).logits.float()
            total += _resize(logits.flip(-1) if index == 1 else logits, target)
            count += 1
    return _resize(torch.softmax(total / count, dim=1), (height, width))[0]


@pytest.fixture(scope="module")
def trainer(small_demo, tmp_path_factory) -> Trainer:
    """Teacher, student (random decoder) and data of the tiny run; nothing trained."""
    config = tiny_config(small_demo, tmp_path_factory.mktemp("run"), "train.device=cpu", "data.val_limit=3",
                         "data.pseudo_subset=2")
    return Trainer(config)


def _predictor(trainer: Trainer, **settings) -> Predictor:
    cfg = EvalConfig(long_side=LONG_SIDE, scales=SCALES, **settings)
    trainer.heads[0].student.eval()  # validate() leaves it training
    return Predictor(trainer.teacher, trainer.heads[0].student, Runtime(torch.device("cpu"), None), cfg)


def _images(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, *SIZE, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("flip", [True, False])
def test_probs_equal_the_per_view_loop(trainer, flip):
    predictor = _predictor(trainer, flip=flip)
    images = _images(2)
    probs = predictor.probs(images)
    assert probs.shape == (2, NUM_CLASSES, *SIZE)
    for b in range(2):
        expected = reference_probs(predictor.teacher, predictor.student, images[b : b + 1], predictor.settings)
        assert torch.allclose(probs[b], expected, atol=TOLERANCE), (probs[b] - expected).abs().max()


def test_each_scale_is_one_forward_with_its_mirror(trainer, monkeypatch):
    predictor = _predictor(trainer, flip=True)
    encoder = predictor.teacher.encoder
    shapes = []
    original = encoder.encode_image

    def counting(images, *args, **kwargs):
        shapes.append(tuple(images.shape))
        return original(images, *args, **kwargs)

    monkeypatch.setattr(encoder, "encode_image", counting)
    predictor.probs(_images(3))
    assert shapes == [(6, 3, 88, 120), (6, 3, 66, 90)]  # 3 images + 3 mirrors, per scale


def test_pixels_of_inverts_normalise_exactly():
    levels = np.arange(256, dtype=np.uint8)
    rows, cols = np.meshgrid(levels, levels, indexing="ij")
    image = np.stack([rows, cols, 255 - rows], axis=-1)  # every level in every channel, (256, 256, 3)
    assert np.array_equal(pixels_of(normalise(image)[None])[0], image)


def test_crf_masks_see_the_original_pixels(trainer):
    predictor = _predictor(trainer, flip=False)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (*SIZE, 3), dtype=np.uint8)
    tensor = normalise(image)[None]
    expected = dense_crf(image, predictor.probs(tensor)[0].numpy(), predictor.settings).argmax(0)
    mask = predictor.masks(tensor, crf=True)
    assert mask.shape == (1, *SIZE) and mask.dtype == np.uint8
    assert np.array_equal(mask[0], expected)
    assert np.array_equal(predictor.masks(tensor, crf=False)[0], predictor.probs(tensor)[0].argmax(0).numpy())


def test_predict_chunks_rgb_batches(trainer, monkeypatch):
    monkeypatch.setattr(predict_module, "PREDICT_BATCH", 2)
    predictor = _predictor(trainer, flip=True)
    rgb = np.random.default_rng(1).integers(0, 256, (3, *SIZE, 3), dtype=np.uint8)
    masks = predictor.predict(rgb)
    assert masks.shape == (3, *SIZE) and masks.dtype == np.uint8
    for image, mask in zip(rgb, masks):
        assert np.array_equal(mask, predictor.masks(normalise(image)[None])[0])
    assert predictor.predict(rgb[:0]).shape == (0, *SIZE)


def test_validation_encodes_each_image_once(trainer, monkeypatch, tmp_path):
    """One encoder forward per image: val images (features) + pseudo-subset images (one teacher pass
    serving the decoder prediction and the three pseudo-label variants); PAR once per variant using it."""
    encoder = trainer.teacher.encoder
    encoded = []
    original = encoder.encode_image

    def counting(images, *args, **kwargs):
        encoded.append(images.shape[0])
        return original(images, *args, **kwargs)

    refined_by_par = []
    original_par = pseudo_module.par

    def counting_par(images, *args, **kwargs):
        refined_by_par.append(images.shape[0])
        return original_par(images, *args, **kwargs)

    monkeypatch.setattr(encoder, "encode_image", counting)
    monkeypatch.setattr(pseudo_module, "par", counting_par)  # `cam_par` (pseudo_labels)
    monkeypatch.setattr(labeler_module, "par", counting_par)  # `refined` (refine_together)
    head = trainer.heads[0]
    assert head.labeler.settings.par.enabled
    result = validate(trainer.teacher, head.student, head.labeler, trainer.val_set, trainer.pseudo_set, 0,
                      trainer.runtime, tmp_path)
    assert sum(encoded) == len(trainer.val_set) + len(trainer.pseudo_set) == 5
    assert sum(refined_by_par) == 2 * len(trainer.pseudo_set)  # once for `cam_par`, once for `refined`
    assert set(result.pseudo) == {"cam", "cam_par", "refined"}


def test_logits_run_at_the_images_own_size(trainer):
    predictor = _predictor(trainer)
    images = _images(2)
    with torch.no_grad():
        expected = trainer.heads[0].student(trainer.teacher.features(images), SIZE).logits
    assert torch.equal(predictor.logits(images), expected)
