"""CLIP ViT encoder: per-block maps at any size, OpenAI TorchScript files through open_clip."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch

from affseg.backbones import CheckpointError, build_encoder, tokenize
from affseg.backbones.clip_vit import CLIP_VIT_TINY, resample_position_embedding

# OpenAI's archives carry these as 0-dim tensors; open_clip drops them when it rebuilds the model
OPENAI_EXTRA_ENTRIES = {"input_resolution": 224, "context_length": 77, "vocab_size": 49408}


def write_openai_archive(model: torch.nn.Module, path) -> None:
    """Save an open_clip CLIP as a TorchScript archive with OpenAI's state-dict keys."""
    archive = copy.deepcopy(model)
    causal_mask = archive.attn_mask
    del archive._buffers["attn_mask"]  # OpenAI's causal mask is a plain attribute, not in the state dict
    archive.attn_mask = causal_mask
    for name, value in OPENAI_EXTRA_ENTRIES.items():
        archive.__dict__.pop(name, None)
        archive.register_buffer(name, torch.tensor(value))
    example = (torch.zeros(1, 3, CLIP_VIT_TINY.image_size, CLIP_VIT_TINY.image_size), tokenize("a dog"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, OpenAI's files are TorchScript
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shape checks traced as constants: fine here
        torch.jit.save(torch.jit.trace(archive, example, check_trace=False), str(path))


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    encoder = build_encoder("clip_vit_tiny")
    with torch.no_grad():  # open_clip's loader passes weights through fp16: make them fp16-exact
        for parameter in encoder.parameters():
            parameter.copy_(parameter.half().float())
    return encoder


@pytest.fixture(scope="module")
def archive(tiny, tmp_path_factory):
    path = tmp_path_factory.mktemp("clip") / "ViT-tiny.pt"
    write_openai_archive(tiny.model, path)
    return path


@pytest.mark.parametrize("size", [(224, 224), (320, 224), (500, 333)])
def test_block_maps_at_any_size(tiny, size):
    with torch.no_grad():
        features = tiny.encode_image(torch.randn(1, 3, *size))
    grid = (math.ceil(size[0] / 16), math.ceil(size[1] / 16))
    assert features.block_strides == [16] * 12 and tiny.stage_blocks(16) == list(range(12))
    assert all(block.shape == (1, CLIP_VIT_TINY.vision_width, *grid) for block in features.blocks)
    assert features.embedding.shape == (1, CLIP_VIT_TINY.embed_dim)


def test_native_size_equals_open_clip(tiny):
    images, tokens = torch.randn(2, 3, 224, 224), tokenize(["a dog", "a cat"])
    with torch.no_grad():
        ours, reference = tiny.encode_image(images).embedding, tiny.model.encode_image(images)
        torch.testing.assert_close(ours, reference, rtol=0, atol=1e-6)
        assert torch.equal(tiny.encode_text(tokens), tiny.model.encode_text(tokens))
    assert torch.equal(tiny.logit_multiplier(), tiny.model.logit_scale.exp())


def test_position_embeddings_resampled_to_the_grid():
    embedding = torch.randn(1 + 14 * 14, 8)
    assert resample_position_embedding(embedding, (14, 14), (14, 14)) is embedding
    resampled = resample_position_embedding(embedding, (14, 14), (20, 14))
    assert resampled.shape == (1 + 20 * 14, 8)
    assert torch.equal(resampled[0], embedding[0])  # class slot kept
    constant = torch.ones(1 + 14 * 14, 8)
    torch.testing.assert_close(resample_position_embedding(constant, (14, 14), (20, 14)), torch.ones(1 + 20 * 14, 8))


def test_openai_archive_round_trip(tiny, archive):
    loaded = build_encoder("clip_vit_tiny", checkpoint=archive)
    assert not any(p.requires_grad for p in loaded.parameters())
    images, tokens = torch.randn(1, 3, 320, 224), tokenize(["a clean origami dog."])
    with torch.no_grad():
        expected, features = tiny.encode_image(images), loaded.encode_image(images)
        assert torch.equal(features.embedding, expected.embedding)
        assert all(torch.equal(a, b) for a, b in zip(features.blocks, expected.blocks))
        assert torch.equal(loaded.encode_text(tokens), tiny.encode_text(tokens))


def test_wrong_architecture_or_file_is_a_one_line_error(archive, tmp_path):
    with pytest.raises(CheckpointError) as info:
        build_encoder("clip_vit_b16", checkpoint=archive)
    message = str(info.value)
    assert "\n" not in message and str(archive) in message
    assert "visual.class_embedding: file (64) vs model (768)" in message and "clip_vit_b16" in message
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="cannot load as an OpenAI CLIP file"):
        build_encoder("clip_vit_tiny", checkpoint=garbage)


def test_grad_block_on_padded_input(tiny):
    target = 10
    features = tiny.encode_image(torch.randn(1, 3, 250, 333), grad_block=target)
    leaf = features.blocks[target]
    assert leaf.is_leaf and leaf.shape[-2:] == (16, 21)
    (grad,) = torch.autograd.grad(features.embedding.sum(), leaf)
    assert grad.abs().sum() > 0
    assert all(p.grad is None for p in tiny.parameters())


def test_full_vit_b16_shapes():
    encoder = build_encoder("clip_vit_b16")
    with torch.no_grad():
        features = encoder.encode_image(torch.randn(1, 3, 320, 224))
    assert len(features.blocks) == 12 and all(block.shape == (1, 768, 20, 14) for block in features.blocks)
    assert features.embedding.shape == (1, 512)


@pytest.mark.parametrize("dropped", ["visual.ln_post.weight", "ln_final.bias", "positional_embedding", "visual.proj"])
def test_missing_key_is_named_in_one_line(tiny, tmp_path, dropped):
    # an OpenAI-layout state dict without one key: the error must name that key, in one line
    state = {key: value for key, value in tiny.model.state_dict().items() if key != dropped}
    path = tmp_path / "state_dict.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as info:
        build_encoder("clip_vit_tiny", checkpoint=path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message and dropped in message
