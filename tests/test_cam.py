"""CAMs: hand-computed gradient rules and batched compute_cams on a tiny fake encoder."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from affseg.cam import cam_from_gradients, compute_cams, minmax_normalise

NUM_FG = 20
NUM_BG = 3


@dataclass
class FakeFeatures:
    blocks: list[Tensor]
    block_strides: list[int]
    embedding: Tensor


class FakeEncoder(nn.Module):
    """Stride-16 patch conv, then three residual conv blocks; embedding = linear(mean pool)."""

    embed_dim = 8
    grid_stride = 16

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, kernel_size=16, stride=16)
        self.convs = nn.ModuleList(nn.Conv2d(6, 6, kernel_size=3, padding=1) for _ in range(3))
        self.proj = nn.Linear(6, self.embed_dim)
        self.requires_grad_(False)

    def encode_image(self, images: Tensor, grad_block: int | None = None) -> FakeFeatures:
        blocks = []
        x = images
        for index in range(1 + len(self.convs)):
            with torch.set_grad_enabled(grad_block is not None and index > grad_block):
                x = self.stem(x) if index == 0 else x + torch.tanh(self.convs[index - 1](x))
            if index == grad_block:
                x = x.detach().requires_grad_(True)
            blocks.append(x)
        with torch.set_grad_enabled(grad_block is not None):
            embedding = self.proj(x.mean(dim=(2, 3)))
        return FakeFeatures(blocks, [16] * len(blocks), embedding)


class FakeClassifier:
    num_foreground = NUM_FG

    def __init__(self, dim: int) -> None:
        generator = torch.Generator().manual_seed(1)
        self.text = F.normalize(torch.randn(NUM_FG + NUM_BG, dim, generator=generator), dim=1)

    def logits(self, image_embedding: Tensor) -> Tensor:
        return 10.0 * F.normalize(image_embedding, dim=1) @ self.text.T


def test_gradcam_hand_example():
    acts = torch.tensor([[[[1.0, 2.0], [0.0, 1.0]], [[3.0, 0.0], [1.0, 1.0]]]])  # (1, 2, 2, 2)
    grads = torch.tensor([[[[1.0, 1.0], [1.0, 1.0]], [[-2.0, 0.0], [0.0, 0.0]]]])
    # weights: channel 0 → 1.0, channel 1 → -0.5; Σ = [[1−1.5, 2], [0−0.5, 1−0.5]] → ReLU
    expected = torch.tensor([[[0.0, 2.0], [0.0, 0.5]]])
    assert torch.allclose(cam_from_gradients(acts, grads, "gradcam"), expected)


def test_layercam_hand_example():
    acts = torch.tensor([[[[1.0, 2.0], [0.0, 1.0]], [[3.0, 0.0], [1.0, 1.0]]]])
    grads = torch.tensor([[[[1.0, -1.0], [1.0, 2.0]], [[-2.0, 0.0], [3.0, 0.5]]]])
    # ReLU(g) ⊙ A summed: [[1·1 + 0, 0 + 0], [0 + 3·1, 2·1 + 0.5·1]]
    expected = torch.tensor([[[1.0, 0.0], [3.0, 2.5]]])
    assert torch.allclose(cam_from_gradients(acts, grads, "layercam"), expected)


def test_gradcampp_matches_closed_form():
    acts = torch.tensor([[[[1.0, 2.0]]]])  # one channel, 1×2, Σ A = 3
    grads = torch.tensor([[[[0.5, 1.0]]]])
    alpha = [g * g / (2 * g * g + 3 * g**3) for g in (0.5, 1.0)]  # [0.25/1.875, 1/5]
    weight = alpha[0] * 0.5 + alpha[1] * 1.0
    expected = torch.tensor([[[weight * 1.0, weight * 2.0]]])
    assert torch.allclose(cam_from_gradients(acts, grads, "gradcampp"), expected, atol=1e-6)


def test_minmax_normalise_per_map():
    cams = torch.tensor([[[[1.0, 3.0]], [[0.0, 0.0]]]])  # (1, 2, 1, 2)
    out = minmax_normalise(cams)
    assert torch.equal(out, torch.tensor([[[[0.0, 1.0]], [[0.0, 0.0]]]]))


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    encoder = FakeEncoder()
    classifier = FakeClassifier(encoder.embed_dim)
    images = torch.randn(3, 3, 64, 80)  # 4×5 grid
    labels = torch.zeros(3, NUM_FG)
    labels[0, [2, 7, 15]] = 1
    labels[1, [4]] = 1
    labels[2, [0, 19]] = 1
    return encoder, classifier, images, labels


@pytest.mark.parametrize("method", ["gradcam", "gradcampp", "layercam"])
def test_compute_cams_absent_zero_present_normalised(setup, method):
    encoder, classifier, images, labels = setup
    cams, features = compute_cams(encoder, classifier, images, labels, cam_block=1, method=method)
    assert cams.shape == (3, NUM_FG, 4, 5)
    assert not cams.requires_grad
    assert all(not block.requires_grad for block in features.blocks)
    absent = labels == 0
    assert torch.equal(cams[absent], torch.zeros_like(cams[absent]))
    present = cams[labels > 0]
    assert present.min() >= 0 and present.max() <= 1
    assert torch.allclose(present.flatten(1).amax(dim=1), torch.ones(len(present)))


def test_compute_cams_batched_equals_per_image(setup):
    encoder, classifier, images, labels = setup
    batched, _ = compute_cams(encoder, classifier, images, labels, cam_block=1, method="gradcam")
    for index in range(len(images)):
        one = slice(index, index + 1)
        single, _ = compute_cams(encoder, classifier, images[one], labels[one], cam_block=1, method="gradcam")
        assert torch.allclose(batched[index], single[0], atol=1e-5)


def test_compute_cams_uses_class_probability_gradient(setup):
    """One image, one class: the map equals Grad-CAM of softmax prob (absent classes masked) by hand."""
    encoder, classifier, images, labels = setup
    image, label = images[1:2], labels[1:2]
    cams, _ = compute_cams(encoder, classifier, image, label, cam_block=1, method="gradcam")

    features = encoder.encode_image(image, grad_block=1)
    logits = classifier.logits(features.embedding)
    logits = torch.cat([logits[:, :NUM_FG].masked_fill(label == 0, float("-inf")), logits[:, NUM_FG:]], dim=1)
    prob = logits.softmax(dim=1)[0, 4]
    (grads,) = torch.autograd.grad(prob, features.blocks[1])
    expected = minmax_normalise(cam_from_gradients(features.blocks[1].detach(), grads)[:, None])[0, 0]
    assert torch.allclose(cams[0, 4], expected, atol=1e-6)
