"""The guards that keep classes the image-level labels call absent out of CAMs and pseudo-labels
(issue 9, item 20): each one is checked on its own, with an input where only that guard decides.
Also: a CLIP checkpoint that loads but lacks the config's keys names them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_cam import NUM_BG, NUM_FG, FakeClassifier, FakeEncoder
from torch import Tensor

from affseg.backbones import CheckpointError, build_encoder
from affseg.cam import compute_cams
from affseg.config import RefineConfig
from affseg.data.classes import BACKGROUND_INDEX
from affseg.refine.pseudo import pseudo_labels, refine_cams

CAM_BLOCK = 1
CELL = 16  # pixels per grid cell (stride-16 grid maps, SPEC §5.1)
GRID = (4, 4)  # grid cells of the pseudo-label inputs: a 64×64 image
CAM_TOLERANCE = 1e-5  # float32 rounding between two equal Grad-CAM computations
NEGATIVE_BG_SCORE = -0.1  # a constant background below every foreground score (not range-checked by the config)


class TextClassifier(FakeClassifier):
    """FakeClassifier with given text features (K_fg + K_bg, D): the logits are 10 · cos(embedding, text)."""

    def __init__(self, text: Tensor, num_foreground: int) -> None:
        self.text = text
        self.num_foreground = num_foreground


@pytest.fixture(scope="module")
def cam_setup():
    torch.manual_seed(0)
    encoder = FakeEncoder()
    images = torch.randn(3, 3, 64, 80)  # 4×5 grid
    labels = torch.zeros(3, NUM_FG)
    labels[0, [2, 7]] = 1
    labels[1, [4]] = 1
    labels[2, [0, 19]] = 1
    return encoder, FakeClassifier(encoder.embed_dim), images, labels


@pytest.mark.parametrize("method", ["gradcam", "gradcampp", "layercam"])
def test_absent_class_is_out_of_the_cam_softmax(cam_setup, method):
    """`compute_cams` masks absent foreground logits out of the softmax: the present CAMs equal those of a
    classifier that never had absent class 5, and do not move when class 5's text points at the image."""
    encoder, classifier, images, labels = cam_setup
    dropped = 5  # absent in every image
    cams, _ = compute_cams(encoder, classifier, images, labels, CAM_BLOCK, method)

    keep = [index for index in range(NUM_FG + NUM_BG) if index != dropped]
    without = TextClassifier(classifier.text[keep], NUM_FG - 1)
    fg_keep = [index for index in range(NUM_FG) if index != dropped]
    fewer, _ = compute_cams(encoder, without, images, labels[:, fg_keep], CAM_BLOCK, method)
    assert torch.allclose(cams[:, fg_keep], fewer, atol=CAM_TOLERANCE)

    with torch.no_grad():  # class 5's text = the mean image embedding: a large, image-dependent logit
        embedding = encoder.encode_image(images).embedding
    text = classifier.text.clone()
    text[dropped] = F.normalize(embedding.mean(dim=0), dim=0)
    moved, _ = compute_cams(encoder, TextClassifier(text, NUM_FG), images, labels, CAM_BLOCK, method)
    assert torch.allclose(moved, cams, atol=CAM_TOLERANCE)


def _padded_batch() -> tuple[Tensor, Tensor, Tensor]:
    """Grid maps (2, K_fg, 4, 4), labels (2, K_fg), images (2, 3, 64, 64).

    Image 0 has one present class (3), image 1 two (1, 6): image 0's second slot is padding and gathers
    its first absent class, 0, whose map is strong exactly where class 3 is weak.
    """
    generator = torch.Generator().manual_seed(0)
    maps = torch.zeros(2, NUM_FG, *GRID)
    maps[0, 3] = torch.linspace(1.0, 0.0, GRID[0] * GRID[1]).view(GRID)
    maps[0, 0] = torch.linspace(0.0, 50.0, GRID[0] * GRID[1]).view(GRID)  # absent in image 0
    maps[1, 1, :2] = 1.0
    maps[1, 6, 2:] = 1.0
    labels = torch.zeros(2, NUM_FG)
    labels[0, 3] = 1
    labels[1, [1, 6]] = 1
    images = torch.rand(2, 3, GRID[0] * CELL, GRID[1] * CELL, generator=generator)
    return maps, labels, images


@pytest.mark.parametrize("use_par", [False, True])
def test_padded_slot_does_not_lower_the_background(use_par):
    """`pseudo_labels` zeroes the padded slots (`* valid`): in a batch, an image with fewer present classes
    gets exactly the labels it gets alone, whatever the absent class that its padded slot gathers."""
    maps, labels, images = _padded_batch()
    cfg = RefineConfig()
    batched = pseudo_labels(maps, labels, images, cfg, use_par=use_par)
    alone = pseudo_labels(maps[:1], labels[:1], images[:1], cfg, use_par=use_par)
    assert (alone[0] == BACKGROUND_INDEX).any() and (alone[0] == 3 + 1).any()
    assert torch.equal(batched[0], alone[0])


def test_padded_slot_after_refine_cams():
    """The same through the refinement chain: `refine_cams` walks whatever maps it is given (absent class 0
    of image 0 included), and the pseudo-labels of image 0 still do not depend on its batch mate."""
    maps, labels, images = _padded_batch()
    cfg = RefineConfig(warmup_blocks=2)
    cells = GRID[0] * GRID[1]
    generator = torch.Generator().manual_seed(1)
    aff_enc = torch.rand(2, cfg.warmup_blocks, cells, cells, generator=generator)
    refined = refine_cams(maps, aff_enc, None, cfg)
    assert refined[0, 0].amax() > 0  # the absent map survived the walk: only the guard in pseudo_labels is left
    batched = pseudo_labels(refined, labels, images, cfg, use_par=False)
    alone_refined = refine_cams(maps[:1], aff_enc[:1], None, cfg)
    alone = pseudo_labels(alone_refined, labels[:1], images[:1], cfg, use_par=False)
    assert torch.equal(batched[0], alone[0])


def test_image_without_present_class_is_background_under_a_negative_background():
    """The argmax runs over background + valid slots only (`allowed`): with a constant background below 0,
    an image without any present class, batched with one that has a class, stays background everywhere
    instead of taking the class that its padded slot gathers."""
    maps = torch.zeros(2, NUM_FG, *GRID)
    maps[1, 2] = 1.0
    labels = torch.zeros(2, NUM_FG)
    labels[1, 2] = 1
    images = torch.rand(2, 3, GRID[0] * CELL, GRID[1] * CELL, generator=torch.Generator().manual_seed(0))
    cfg = RefineConfig(background="constant", bg_score=NEGATIVE_BG_SCORE)
    out = pseudo_labels(maps, labels, images, cfg, use_par=False)
    assert (out[0] == BACKGROUND_INDEX).all()
    assert (out[1] == 2 + 1).all()


def test_clip_checkpoint_one_block_short_names_the_missing_keys(tmp_path):
    """open_clip infers the depth from the file and loads 11 vision blocks without complaint: only the
    check against clip_vit_tiny's 12 blocks (`check_state_dict`) can name what is missing."""
    torch.manual_seed(0)
    state = build_encoder("clip_vit_tiny").model.state_dict()
    last = "visual.transformer.resblocks.11."
    path = tmp_path / "short.pt"
    torch.save({key: value for key, value in state.items() if not key.startswith(last)}, path)
    with pytest.raises(CheckpointError) as info:
        build_encoder("clip_vit_tiny", checkpoint=path)
    message = str(info.value)
    dropped = sum(key.startswith(last) for key in state)
    assert "\n" not in message and str(path) in message
    assert f"{dropped} missing [{last}ln_1.weight, " in message and "(checked against 'clip_vit_tiny')" in message
