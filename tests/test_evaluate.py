"""Evaluation on a 2-iteration checkpoint of the tiny model: loading, multi-scale probabilities,
scoring, palette export, dense CRF and the `affseg evaluate` command."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from test_train import tiny_config

import affseg.data.voc as voc_module
from affseg.cli import main
from affseg.config import EvalConfig
from affseg.crf import dense_crf
from affseg.data.classes import IGNORE_INDEX, NUM_CLASSES, voc_palette
from affseg.data.transforms import normalise
from affseg.data.voc import VocSegmentation, read_image
from affseg.evaluate import TrainedModel, evaluate, load_predictor, load_trained
from affseg.engine.checkpoint import BEST_CHECKPOINT, load_checkpoint
from affseg.engine.trainer import Trainer
from affseg.train import train

LONG_SIDE = 200  # eval.long_side of the fixture run (small: fast, and not a multiple of 32)
# A 100 × 140 input at long side 200: target (round(100 · 200 / 140), 200) = (143, 200); the encoder
# pads it to a multiple of 16 itself and the decoder crops back (SPEC §5.1).
INPUT_SIZE = (100, 140)
TARGET_SIZE = (143, 200)
NETWORK_SIZE = TARGET_SIZE  # scale 1.0 runs at the target size itself: no rounding to multiples of 32


def _resize(tensor: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(tensor, size=size, mode="bilinear", align_corners=False)


@pytest.fixture(scope="module")
def run(small_demo, tmp_path_factory):
    """(config, best.pt) of a 2-iteration training run."""
    out = tmp_path_factory.mktemp("run")
    config = tiny_config(small_demo, out, "train.iterations=2", "train.val_interval=2", f"eval.long_side={LONG_SIDE}")
    result = train(config)
    assert result.best_checkpoint == out / BEST_CHECKPOINT and result.best_checkpoint.is_file()
    return config, result.best_checkpoint


@pytest.fixture(scope="module")
def trained(run) -> TrainedModel:
    return load_trained(run[1], device="cpu")


def test_load_trained_restores_decoder_and_training_encoder(run, trained):
    config, best = run
    saved = load_checkpoint(best)["decoder"]
    restored = trained.student.decoder.state_dict()
    assert restored.keys() == saved.keys()
    assert all(torch.equal(restored[key], saved[key]) for key in saved)
    assert not trained.student.training and trained.config.eval.long_side == LONG_SIDE
    # model.checkpoint=random: the encoder must be the one training drew (seeded by train.seed)
    training_encoder = Trainer(config).teacher.encoder.state_dict()
    loaded_encoder = trained.teacher.encoder.state_dict()
    assert all(torch.equal(loaded_encoder[key], value) for key, value in training_encoder.items())


def _probs(trained: TrainedModel, image: torch.Tensor, **settings) -> torch.Tensor:
    """(1, 3, H, W) → (21, H, W) through the checkpoint's Predictor with `settings` changed."""
    predictor = trained.predictor()
    predictor.settings = dataclasses.replace(predictor.settings, **settings)
    return predictor.probs(image)[0]


def test_predict_probs_single_scale_equals_hand_construction(trained):
    image = torch.randn(1, 3, *INPUT_SIZE, generator=torch.Generator().manual_seed(0))
    probs = _probs(trained, image, scales=[1.0], flip=False)

    logits = _resize(trained.logits(_resize(image, NETWORK_SIZE)), TARGET_SIZE)
    expected = _resize(torch.softmax(logits, dim=1), INPUT_SIZE)[0]
    assert probs.shape == (NUM_CLASSES, *INPUT_SIZE)
    assert torch.allclose(probs, expected, atol=1e-6)

    # averaged logits of the view and its mirror
    mirror = _resize(trained.logits(_resize(image, NETWORK_SIZE).flip(-1)).flip(-1), TARGET_SIZE)
    expected = _resize(torch.softmax((logits + mirror) / 2, dim=1), INPUT_SIZE)[0]
    assert torch.allclose(_probs(trained, image, scales=[1.0], flip=True), expected, atol=1e-6)


def test_predict_probs_multi_scale_is_a_distribution(trained):
    image = torch.randn(1, 3, *INPUT_SIZE, generator=torch.Generator().manual_seed(1))
    probs = _probs(trained, image)  # scales 1.0, 0.75 and flip
    assert probs.shape == (NUM_CLASSES, *INPUT_SIZE)
    assert (probs >= 0).all()
    assert torch.allclose(probs.sum(dim=0), torch.ones(INPUT_SIZE), atol=1e-5)


def test_load_predictor_serves_the_checkpoints_masks(small_demo, run, trained):
    val = VocSegmentation(small_demo, "val")
    image = read_image(val.layout.image(val.ids[0]))  # (H, W, 3) uint8
    masks = load_predictor(run[1], device="cpu").predict(image[None])
    assert masks.shape == (1, *image.shape[:2]) and masks.dtype == np.uint8
    assert np.array_equal(masks, trained.predictor().masks(normalise(image)[None]))


def test_evaluate_val_counts_every_labelled_pixel(small_demo, trained):
    scores = evaluate(trained, "val")
    val = VocSegmentation(small_demo, "val")
    labelled = sum(int((val[i]["mask"] != IGNORE_INDEX).sum()) for i in range(len(val)))
    assert scores.confusion.shape == (NUM_CLASSES, NUM_CLASSES)
    assert scores.confusion.sum() == labelled
    assert 0.0 <= scores.miou <= 1.0 and 0.0 <= scores.pixel_acc <= 1.0


def test_evaluate_decodes_each_image_once(small_demo, trained, monkeypatch):
    decoded = []
    original = voc_module.read_image
    monkeypatch.setattr(voc_module, "read_image", lambda path: decoded.append(path.name) or original(path))
    evaluate(trained, "val", limit=3)
    assert sorted(decoded) == sorted(f"{i}.jpg" for i in VocSegmentation(small_demo, "val").ids[:3])


def test_evaluate_in_workers_scores_the_same(trained):
    in_process = evaluate(trained, "val", limit=3)
    config = copy.deepcopy(trained.config)
    config.data.num_workers = 2
    in_workers = evaluate(dataclasses.replace(trained, config=config), "val", limit=3)
    assert np.array_equal(in_workers.confusion, in_process.confusion)


def test_evaluate_test_exports_palette_pngs(small_demo, trained, tmp_path):
    assert evaluate(trained, "test", export=tmp_path / "png") is None
    test = VocSegmentation(small_demo, "test")
    assert sorted(p.name for p in (tmp_path / "png").iterdir()) == sorted(f"{i}.png" for i in test.ids)
    for image_id in test.ids:
        with Image.open(tmp_path / "png" / f"{image_id}.png") as png:
            assert png.mode == "P"
            assert png.getpalette() == voc_palette()
            with Image.open(test.layout.image(image_id)) as jpeg:
                assert png.size == jpeg.size
            assert np.asarray(png).max() < NUM_CLASSES


def test_dense_crf_snaps_noisy_patches_to_the_colour_edge():
    """Left half black, right half white; unaries favour the half's class 0.6 / 0.4, except one
    wrong 6 × 6 patch inside each half. The CRF must give exactly the colour split."""
    height, width = 32, 48
    confidence = 0.6
    image = np.zeros((height, width, 3), np.uint8)
    image[:, width // 2 :] = 255
    truth = np.zeros((height, width), np.int64)
    truth[:, width // 2 :] = 1
    probs = np.empty((2, height, width), np.float32)
    probs[1] = np.where(truth == 1, confidence, 1 - confidence)
    probs[1, 4:10, 4:10] = confidence  # class 1 claimed inside the black half
    probs[1, 20:26, 36:42] = 1 - confidence  # class 0 claimed inside the white half
    probs[0] = 1 - probs[1]

    refined = dense_crf(image, probs, EvalConfig())
    assert refined.shape == (2, height, width) and refined.dtype == np.float32
    assert np.allclose(refined.sum(axis=0), 1.0, atol=1e-5)
    assert (probs.argmax(0) != truth).sum() == 2 * 36  # the two patches are wrong before
    assert np.array_equal(refined.argmax(0), truth)


def test_cli_evaluate_prints_miou(run, capsys):
    assert main(["evaluate", "--checkpoint", str(run[1]), "--limit", "2"]) == 0
    assert "mIoU" in capsys.readouterr().out


def test_cli_errors_are_one_line(run, tmp_path, capsys):
    missing = tmp_path / "missing.pt"
    assert main(["evaluate", "--checkpoint", str(missing)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error:" in err and "missing.pt" in err

    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    assert main(["evaluate", "--checkpoint", str(run[1]), "--encoder-checkpoint", str(garbage)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error:" in err and "garbage.pth" in err
