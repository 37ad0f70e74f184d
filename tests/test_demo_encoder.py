"""The committed demo encoder: built from the current demo generator, and it learned something."""

import pytest
import torch

from affseg.backbones.demo_weights import DEMO_CHECKPOINTS, demo_checkpoint_record
from affseg.backbones.pretrain import DemoImages, evaluate_zero_shot, positive_matrix, unicl_loss
from affseg.backbones.registry import build_encoder
from affseg.config import DataConfig
from affseg.data.demo import DEMO_FINGERPRINT, DEMO_VERSION, DemoSpec, generator_fingerprint, make_demo

ZERO_SHOT_MARGIN = 0.25  # demo-val mAP must beat the chance level (mean class frequency) by this much


def test_generator_fingerprint_is_current():
    """Changing the demo generator's output needs a DEMO_VERSION bump (and a new demo encoder)."""
    assert generator_fingerprint(0) == DEMO_FINGERPRINT


def test_checkpoint_matches_generator():
    record = demo_checkpoint_record()
    assert record["demo_version"] == DEMO_VERSION, "demo generator changed: rebuild the demo encoder (README)"
    assert record["demo_seed"] == DataConfig().demo_seed
    assert DEMO_CHECKPOINTS["unicl_swin_tiny"].stat().st_size < 25 * 2**20


def test_pretraining_loss_dropped():
    record = demo_checkpoint_record()
    assert record["history"][-1]["loss"] < 0.6 * record["first_loss"]


@pytest.fixture(scope="module")
def fresh_val(tmp_path_factory):
    """Demo images the encoder never saw (another seed)."""
    root = make_demo(tmp_path_factory.mktemp("fresh"), DemoSpec(seed=101, train=1, val=60, test=1))
    return DemoImages(root, "val")


def test_zero_shot_far_above_chance(fresh_val):
    encoder = build_encoder("unicl_swin_tiny", checkpoint=DEMO_CHECKPOINTS["unicl_swin_tiny"])
    scores = evaluate_zero_shot(encoder, fresh_val)
    assert scores["map"] > scores["map_chance"] + ZERO_SHOT_MARGIN


def test_unicl_loss_hand_values():
    """Two images, three prompts; image 0 has prompts {0, 2}, image 1 has {1}."""
    logits = torch.tensor([[2.0, 0.0, 1.0], [0.0, 3.0, 0.0]])
    positives = torch.tensor([[True, False, True], [False, True, False]])
    log_rows = torch.log_softmax(logits, 1)
    log_cols = torch.log_softmax(logits, 0)
    i2t = (-(log_rows[0, 0] + log_rows[0, 2]) / 2 - log_rows[1, 1]) / 2
    t2i = (-log_cols[0, 0] - log_cols[1, 1] - log_cols[0, 2]) / 3
    assert unicl_loss(logits, positives) == pytest.approx(float(i2t + t2i))


def test_positive_matrix_marks_labels_and_background():
    labels = torch.zeros(2, 20)
    labels[0, [3, 7]] = 1
    positives = positive_matrix(labels, torch.tensor([2, -1]), num_prompts=25)
    assert positives[0].nonzero().flatten().tolist() == [3, 7, 22]
    assert positives[1].sum() == 0
