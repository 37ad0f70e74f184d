"""Teacher → student → pseudo-labeler on the random tiny encoder: output contract, frozen encoder,
absent classes, the refine_start switch and the pseudo-label variants used by validation."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from test_train import tiny_config
from torch import Tensor

from affseg.config import Config
from affseg.data.classes import BACKGROUND_INDEX, IGNORE_INDEX, NUM_CLASSES, NUM_FOREGROUND
from affseg.data.voc import VocSegmentation
from affseg.engine.trainer import Trainer
from affseg.losses import method_losses
from affseg.method import (PseudoLabeler, Student, Teacher, build_pseudo_labeler, build_student,
                           build_teacher)

SEED = 0
HEIGHT, WIDTH = 128, 96  # not square, so a swapped h/w would show
STRIDE = 16
GRID = (HEIGHT // STRIDE, WIDTH // STRIDE)  # (8, 6)
BATCH = 2
CANDIDATES = 6  # two-class images searched for a class to declare absent
ITERATIONS = 30
REFINE_START = 0.5  # A_f joins the refinement at iteration 0.5 · 30 = 15
FIRST_ACTIVE = 15
PERTURBATION = 0.5  # std of the noise added to every decoder weight
MIN_EFFECT = 1e-3  # smallest change of the refined maps that counts as "depends on the decoder"


@dataclass
class Output:
    """One training forward, as a head computes it: logits (B, 21, H, W), aff_dec (B, N, N),
    cams and refined (B, 20, h, w), pseudo (B, H, W)."""

    logits: Tensor
    aff_dec: Tensor
    cams: Tensor
    refined: Tensor
    pseudo: Tensor


@dataclass
class Method:
    """The three parts built from one config; calling it runs them in training order."""

    config: Config
    teacher: Teacher
    student: Student
    labeler: PseudoLabeler

    def __call__(self, images, labels, iteration: int, valid=None) -> Output:
        taught = self.teacher(images, labels, valid)
        output = self.student(taught.features, images.shape[-2:])
        refinement = self.labeler(taught, output.aff_dec, iteration)
        return Output(output.logits, output.aff_dec, taught.cams, refinement.refined, refinement.pseudo)

    def losses(self, output: Output) -> dict[str, Tensor]:
        return method_losses(output.logits, output.aff_dec, output.pseudo, output.cams.shape[-2:], self.config.loss)

    def eval(self) -> "Method":
        self.teacher.eval()
        self.student.eval()
        return self


def make_model(root, out, *overrides: str) -> Method:
    """The tiny random-encoder method, seeded so every call builds the same weights."""
    config = tiny_config(root, out, f"train.iterations={ITERATIONS}", f"refine.refine_start={REFINE_START}",
                         *overrides)
    torch.manual_seed(SEED)
    teacher = build_teacher(config)
    return Method(config, teacher, build_student(config, teacher), build_pseudo_labeler(config))


def two_class_items(root, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `count` train images with two present classes: images (B, 3, H, W), labels (B, 20)."""
    dataset = VocSegmentation(root, "train_aug")
    items = [dataset[i] for i in range(len(dataset)) if dataset[i]["labels"].sum() >= 2][:count]
    images = torch.stack([item["image"] for item in items])
    images = F.interpolate(images, size=(HEIGHT, WIDTH), mode="bilinear", align_corners=False)
    return images, torch.stack([item["labels"] for item in items])


@pytest.fixture(scope="module")
def batch(small_demo) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = two_class_items(small_demo, BATCH)
    assert len(images) == BATCH, "the small demo set should hold two-class images"
    return images, labels


@pytest.fixture(scope="module")
def model(small_demo, tmp_path_factory) -> Method:
    return make_model(small_demo, tmp_path_factory.mktemp("model")).eval()


def allowed_values(labels: torch.Tensor) -> list[set[int]]:
    """Per image: background, VOC index of every present class, ignore."""
    return [{BACKGROUND_INDEX, IGNORE_INDEX} | {int(c) + 1 for c in row.nonzero().flatten()} for row in labels]


def test_output_shapes(model, batch):
    images, labels = batch
    output = model(images, labels, iteration=0)
    cells = GRID[0] * GRID[1]
    assert output.logits.shape == (BATCH, NUM_CLASSES, HEIGHT, WIDTH)
    assert output.aff_dec.shape == (BATCH, cells, cells)
    assert output.cams.shape == (BATCH, NUM_FOREGROUND, *GRID)
    assert output.refined.shape == (BATCH, NUM_FOREGROUND, *GRID)
    assert output.pseudo.shape == (BATCH, HEIGHT, WIDTH)
    assert output.pseudo.dtype == torch.int64
    assert output.aff_dec.requires_grad and not output.cams.requires_grad and not output.refined.requires_grad
    # CAMs: absent classes exactly 0, present ones min-max normalised (max 1)
    absent = labels == 0
    assert (output.cams[absent] == 0).all() and (output.refined[absent] == 0).all()
    assert torch.allclose(output.cams[~absent].flatten(1).amax(dim=1), torch.ones(int((~absent).sum())))


def test_encoder_is_frozen_and_only_decoder_gets_gradients(small_demo, tmp_path, batch):
    model = make_model(small_demo, tmp_path)
    images, labels = batch
    assert not any(p.requires_grad for p in model.teacher.parameters())
    model.teacher.train()
    model.student.train()
    assert not any(module.training for module in model.teacher.encoder.modules())
    assert all(module.training for module in model.student.decoder.modules())

    output = model(images, labels, iteration=FIRST_ACTIVE)
    model.losses(output)["loss"].backward()
    for name, parameter in model.student.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
    assert all(parameter.grad is None for parameter in model.teacher.parameters())

    trainer = Trainer(model.config)  # the optimiser the training loop builds
    head = trainer.heads[0]
    optimised = {id(p) for group in head.optimiser.param_groups for p in group["params"]}
    assert optimised == {id(p) for p in head.student.parameters()}


@pytest.mark.parametrize("ignore_band", [False, True])
def test_pseudo_labels_never_contain_absent_classes(small_demo, tmp_path, ignore_band):
    model = make_model(small_demo, tmp_path, f"refine.ignore_band={str(ignore_band).lower()}").eval()
    images, labels = two_class_items(small_demo, CANDIDATES)
    full = model(images, labels, iteration=FIRST_ACTIVE).pseudo
    for image, values in enumerate(allowed_values(labels)):
        assert set(full[image].unique().tolist()) <= values
    assert bool((full == IGNORE_INDEX).any()) == ignore_band  # 255 only from the ignore band

    # declare absent, per image, the present class that won the most pixels with the true labels
    reduced = labels.clone()
    dropped: dict[int, int] = {}
    for image in range(len(images)):
        counts = torch.bincount(full[image].flatten(), minlength=IGNORE_INDEX + 1)[1 : NUM_FOREGROUND + 1]
        counts = counts * labels[image].long()
        if counts.max() > 0:
            dropped[image] = int(counts.argmax())
            reduced[image, dropped[image]] = 0
    assert dropped, "precondition: some present class wins pixels with the true labels"
    pseudo = model(images, reduced, iteration=FIRST_ACTIVE).pseudo
    for image, values in enumerate(allowed_values(reduced)):
        found = set(pseudo[image].unique().tolist())
        assert found <= values
        if image in dropped:
            assert dropped[image] + 1 not in found


def test_refinement_switch_and_decoder_dependence(small_demo, tmp_path, batch):
    model = make_model(small_demo, tmp_path).eval()
    assert [model.labeler.uses_decoder(i) for i in (0, FIRST_ACTIVE - 1, FIRST_ACTIVE, ITERATIONS)] == [
        False, False, True, True,
    ]
    images, labels = batch
    before = model(images, labels, iteration=FIRST_ACTIVE - 1)
    after = model(images, labels, iteration=FIRST_ACTIVE)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(SEED)
        for parameter in model.student.parameters():
            parameter.add_(PERTURBATION * torch.randn(parameter.shape, generator=generator))
    before_perturbed = model(images, labels, iteration=FIRST_ACTIVE - 1)
    after_perturbed = model(images, labels, iteration=FIRST_ACTIVE)

    assert not torch.allclose(before.logits, before_perturbed.logits)  # the perturbation is real
    assert torch.equal(before.cams, before_perturbed.cams)
    assert torch.equal(before.refined, before_perturbed.refined)  # warm-up: encoder affinities only
    assert (after.refined - after_perturbed.refined).abs().max() > MIN_EFFECT  # A_f weighs the affinities


@pytest.mark.parametrize("iteration", [0, FIRST_ACTIVE])
def test_pseudo_label_variants_match_training_pseudo_labels(model, batch, iteration):
    images, labels = batch
    taught = model.teacher(images, labels)
    variants = model.labeler.variants(taught, model.student(taught.features, images.shape[-2:]).aff_dec, iteration)
    assert set(variants) == {"cam", "cam_par", "refined"}
    for kind, pseudo in variants.items():
        assert pseudo.shape == (BATCH, HEIGHT, WIDTH) and pseudo.dtype == torch.int64, kind
        for image, values in enumerate(allowed_values(labels)):
            assert set(pseudo[image].unique().tolist()) <= values, kind
    assert torch.equal(variants["refined"], model(images, labels, iteration).pseudo)


def test_refinement_stays_float32_under_autocast(model, batch):
    """Autocast would run the affinity products and the random walk in bf16: the labeler turns it off."""
    images, labels = batch
    taught = model.teacher(images, labels)
    with torch.no_grad():
        aff_dec = model.student(taught.features, images.shape[-2:]).aff_dec
    plain = model.labeler(taught, aff_dec, FIRST_ACTIVE)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = model.labeler(taught, aff_dec, FIRST_ACTIVE)
    assert mixed.refined.dtype == torch.float32
    assert torch.equal(mixed.refined, plain.refined) and torch.equal(mixed.pseudo, plain.pseudo)


def test_renormalisation_maps_imagenet_pixels_to_encoder_statistics():
    from affseg.data.transforms import IMAGENET_MEAN, IMAGENET_STD
    from affseg.method.build import renormalisation

    clip_mean, clip_std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    pixels = torch.rand(1, 3, 4, 4)
    imagenet = (pixels - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    scale, shift = renormalisation(clip_mean, clip_std)
    expected = (pixels - torch.tensor(clip_mean).view(1, 3, 1, 1)) / torch.tensor(clip_std).view(1, 3, 1, 1)
    assert torch.allclose(imagenet * scale + shift, expected, atol=1e-5)
    identity_scale, identity_shift = renormalisation(IMAGENET_MEAN, IMAGENET_STD)
    assert torch.allclose(identity_scale, torch.ones(1)) and torch.allclose(identity_shift, torch.zeros(1), atol=1e-7)
