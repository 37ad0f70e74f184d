"""Zero-shot classifier: prompt names, template averaging, cached text features, scaled cosine logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from affseg.backbones import build_encoder, tokenize
from affseg.data.classes import VOC_CLASSES
from affseg.prompts import (
    BACKGROUND_WORDS,
    DEFAULT_TEMPLATE,
    PROMPT_NAMES,
    ZeroShotClassifier,
    class_text_features,
    prompt_name,
)


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return build_encoder("unicl_swin_tiny")


def test_prompt_names_and_background_words():
    assert prompt_name("person") == "person with clothes, people, human"
    assert prompt_name("tvmonitor") == "tvmonitor screen" and prompt_name("cat") == "cat"
    assert set(PROMPT_NAMES) <= set(VOC_CLASSES[1:])
    assert len(BACKGROUND_WORDS) == 25 and BACKGROUND_WORDS[0] == "ground" and BACKGROUND_WORDS[-1] == "sign"
    assert DEFAULT_TEMPLATE.format("dog") == "a clean origami dog."


def test_identical_prompts_give_identical_features(encoder):
    features = class_text_features(encoder, ["dog", "cat", "dog"], [DEFAULT_TEMPLATE])
    assert features.shape == (3, encoder.embed_dim) and not features.requires_grad
    torch.testing.assert_close(features.norm(dim=-1), torch.ones(3))
    assert torch.equal(features[0], features[2]) and not torch.allclose(features[0], features[1])


def test_features_average_normalised_templates(encoder):
    templates = ["a photo of a {}.", "a clean origami {}."]
    features = class_text_features(encoder, ["dog"], templates)
    with torch.no_grad():
        each = F.normalize(encoder.encode_text(tokenize([t.format("dog") for t in templates])), dim=-1)
    torch.testing.assert_close(features[0], F.normalize(each.mean(dim=0), dim=-1))


def test_classifier_logits_are_scaled_cosines(encoder):
    calls = []
    original = encoder.encode_text
    encoder.encode_text = lambda tokens: calls.append(len(tokens)) or original(tokens)
    try:
        classifier = ZeroShotClassifier(encoder, list(VOC_CLASSES[1:]), BACKGROUND_WORDS, [DEFAULT_TEMPLATE])
        embedding = torch.randn(2, encoder.embed_dim, requires_grad=True)
        logits = classifier.logits(embedding)
        classifier.logits(embedding)
    finally:
        del encoder.encode_text
    assert calls == [45]  # 20 classes + 25 background words, encoded once at construction
    assert classifier.num_foreground == 20 and classifier.num_classes == 45 and logits.shape == (2, 45)
    person = VOC_CLASSES.index("person") - 1  # foreground index (no background class in the classifier)
    expected = classifier.text_features[person]  # prompted with its disambiguation
    torch.testing.assert_close(expected, class_text_features(encoder, [PROMPT_NAMES["person"]], [DEFAULT_TEMPLATE])[0])
    cosine = F.cosine_similarity(embedding[0], expected, dim=0)
    torch.testing.assert_close(logits[0, person], encoder.logit_multiplier() * cosine)
    (grad,) = torch.autograd.grad(logits[:, 3].sum(), embedding)  # differentiable for Grad-CAM
    assert grad.abs().sum() > 0


def test_classifier_without_background_words(encoder):
    classifier = ZeroShotClassifier(encoder, ["dog", "cat"], [], [DEFAULT_TEMPLATE])
    assert classifier.num_foreground == 2 and classifier.logits(torch.randn(3, encoder.embed_dim)).shape == (3, 2)
