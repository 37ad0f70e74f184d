"""Grad-CAM trust fixes (issue 9): CLIP's default target block, zero gradients are an error, and
fp16 autocast leaves the CAMs as in fp32."""

from __future__ import annotations

import pytest
import torch
from test_model import two_class_items
from test_train import tiny_config

from affseg.cam import compute_cams
from affseg.config import ConfigError
from affseg.method import build_teacher

FP16_TOLERANCE = 0.02  # max abs CAM difference allowed under fp16 autocast (issue 9, item 7)
CLIP_OVERRIDES = ("model.encoder=clip_vit_tiny", "model.checkpoint=random")


def _cams(model, images, labels, cam_block):
    return compute_cams(model.encoder, model.classifier, model.encoder_input(images), labels, cam_block)[0]


def test_clip_default_cam_block_is_second_to_last_and_gives_cams(small_demo, tmp_path):
    torch.manual_seed(0)
    model = build_teacher(tiny_config(small_demo, tmp_path, *CLIP_OVERRIDES))
    blocks = model.encoder.stage_blocks(model.encoder.grid_stride)
    assert model.cam_block == blocks[-2]
    images, labels = two_class_items(small_demo, 2)
    cams = _cams(model, images, labels, model.cam_block)
    assert (cams[labels > 0].flatten(1).amax(dim=1) > 0).all()  # never all-zero, never silent background


def test_zero_cam_gradient_is_an_error(small_demo, tmp_path):
    # at CLIP's last block the class token is cut from the patch tokens: every gradient there is exactly 0
    torch.manual_seed(0)
    model = build_teacher(tiny_config(small_demo, tmp_path, *CLIP_OVERRIDES, "model.cam_block=-1"))
    images, labels = two_class_items(small_demo, 2)
    with pytest.raises(ConfigError, match="model.cam_block") as error:
        _cams(model, images, labels, model.cam_block)
    assert "\n" not in str(error.value)


def test_swin_default_cam_block_is_the_last(small_demo, tmp_path):
    model = build_teacher(tiny_config(small_demo, tmp_path))
    assert model.cam_block == model.encoder.stage_blocks(model.encoder.grid_stride)[-1]


def test_fp16_autocast_cams_equal_fp32(small_demo, tmp_path):
    model = build_teacher(tiny_config(small_demo, tmp_path, "model.checkpoint="))  # the trained demo encoder
    images, labels = two_class_items(small_demo, 2)
    reference = _cams(model, images, labels, model.cam_block)
    with torch.autocast("cpu", dtype=torch.float16):
        mixed = _cams(model, images, labels, model.cam_block)
    assert mixed.dtype == torch.float32
    assert (mixed - reference).abs().max().item() <= FP16_TOLERANCE


def test_after_the_cam_target_everything_runs_in_fp32_under_fp16_autocast(small_demo, tmp_path):
    # on CPU fp16 autocast rounds too little to move the CAMs much (see above), so check the mechanism:
    # the blocks after the target and the pooled embedding come out float32, whatever the autocast dtype
    model = build_teacher(tiny_config(small_demo, tmp_path, "model.checkpoint="))
    images, _ = two_class_items(small_demo, 2)
    with torch.autocast("cpu", dtype=torch.float16):
        features = model.encoder.encode_image(model.encoder_input(images), grad_block=model.cam_block - 2)
    after = features.blocks[model.cam_block - 2:]
    assert all(block.dtype == torch.float32 for block in after)
    assert features.embedding.dtype == torch.float32 and features.embedding.requires_grad
