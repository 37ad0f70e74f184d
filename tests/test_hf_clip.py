"""CLIP ViT from a Hugging Face folder (issue 9, item 19): our encoder equals CLIPModel's own forward."""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPConfig, CLIPModel

from affseg.backbones import CheckpointError, build_encoder, tokenize
from affseg.backbones.clip_vit import CLIP_VIT_TINY
from affseg.backbones.hf_clip import HfClipEncoder
from affseg.backbones.tokenizer import CONTEXT_LENGTH, EOT_TOKEN_ID, VOCAB_SIZE

TOLERANCE = 1e-5
NATIVE = CLIP_VIT_TINY.image_size


def tiny_hf_config() -> CLIPConfig:
    """The architecture of registry entry `clip_vit_tiny`, in Hugging Face's terms."""
    tiny = CLIP_VIT_TINY
    return CLIPConfig(
        projection_dim=tiny.embed_dim,
        vision_config=dict(hidden_size=tiny.vision_width, num_hidden_layers=tiny.vision_layers,
                           num_attention_heads=tiny.vision_width // 64, intermediate_size=4 * tiny.vision_width,
                           patch_size=tiny.patch_size, image_size=tiny.image_size, hidden_act="quick_gelu"),
        text_config=dict(hidden_size=tiny.text_width, num_hidden_layers=tiny.text_layers,
                         num_attention_heads=tiny.text_width // 64, intermediate_size=4 * tiny.text_width,
                         vocab_size=VOCAB_SIZE, max_position_embeddings=CONTEXT_LENGTH, eos_token_id=EOT_TOKEN_ID,
                         hidden_act="quick_gelu"),
    )


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    torch.manual_seed(0)
    model = CLIPModel(tiny_hf_config()).eval()
    folder = tmp_path_factory.mktemp("hf_clip")
    model.save_pretrained(folder)
    return folder, model


def test_folder_selects_the_hf_encoder_and_matches_its_forward(hf_folder):
    folder, reference = hf_folder
    encoder = build_encoder("clip_vit_tiny", folder)
    assert isinstance(encoder, HfClipEncoder)
    torch.manual_seed(1)
    images = torch.randn(2, 3, NATIVE, NATIVE)
    tokens = tokenize(["a photo of a dog", "a clean origami cat."])
    with torch.no_grad():
        features = encoder.encode_image(images)
        expected = reference.get_image_features(pixel_values=images)
        expected = getattr(expected, "pooler_output", expected)
        hidden = reference.vision_model(pixel_values=images, output_hidden_states=True).hidden_states
        text = encoder.encode_text(tokens)
        expected_text = reference.get_text_features(input_ids=tokens)
        expected_text = getattr(expected_text, "pooler_output", expected_text)
    assert torch.allclose(features.embedding, expected, atol=TOLERANCE)
    assert torch.allclose(text, expected_text, atol=TOLERANCE)
    grid = NATIVE // CLIP_VIT_TINY.patch_size
    assert len(features.blocks) == CLIP_VIT_TINY.vision_layers
    for index, block in enumerate(features.blocks):
        patches = hidden[index + 1][:, 1:].reshape(2, grid, grid, -1).permute(0, 3, 1, 2)
        assert torch.allclose(block, patches, atol=TOLERANCE), index
    assert torch.allclose(encoder.logit_multiplier(), reference.logit_scale.exp())


def test_other_sizes_match_hf_position_interpolation(hf_folder):
    folder, reference = hf_folder
    encoder = build_encoder("clip_vit_tiny", folder)
    images = torch.randn(1, 3, 160, 96)  # multiples of the patch size
    with torch.no_grad():
        ours = encoder.encode_image(images).embedding
        theirs = reference.get_image_features(pixel_values=images, interpolate_pos_encoding=True)
        theirs = getattr(theirs, "pooler_output", theirs)
    assert torch.allclose(ours, theirs, atol=1e-4)


def test_default_cam_target_gets_gradients(hf_folder):
    folder, _ = hf_folder
    encoder = build_encoder("clip_vit_tiny", folder)
    block = encoder.stage_blocks(encoder.grid_stride)[encoder.default_cam_block]
    images = torch.randn(1, 3, 64, 80)
    features = encoder.encode_image(images, grad_block=block)
    (grad,) = torch.autograd.grad(features.embedding.sum(), features.blocks[block])
    assert grad.abs().sum() > 0


def test_folder_without_config_or_with_a_missing_weight_is_one_line(hf_folder, tmp_path):
    folder, reference = hf_folder
    with pytest.raises(CheckpointError, match="config.json") as error:
        build_encoder("clip_vit_tiny", tmp_path)
    assert "\n" not in str(error.value)
    broken = tmp_path / "broken"
    state = {key: value for key, value in reference.state_dict().items() if key != "visual_projection.weight"}
    reference.save_pretrained(broken, state_dict=state)
    with pytest.raises(CheckpointError, match="visual_projection.weight") as error:
        build_encoder("clip_vit_tiny", broken)
    assert "\n" not in str(error.value)
