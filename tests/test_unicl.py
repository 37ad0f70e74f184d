"""UniCL encoder: any-size Swin forward, Grad-CAM leaf, published checkpoint layout, safe loading."""

from __future__ import annotations

import json
import math
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from timm.models.swin_transformer import SwinTransformer, get_relative_position_index

import affseg.backbones.swin as swin
from affseg.backbones import CheckpointError, build_encoder, load_unicl, save_unicl, tokenize
from affseg.backbones.checkpoint import Unpickled, published_state_dict, safe_load
from affseg.backbones.tokenizer import EOT_TOKEN_ID
from affseg.backbones.unicl import UNICL_SWIN_TINY

REFERENCE = Path("/work/shared/reference/unicl_swin_base_state_dict.json")
TINY_STRIDES = [4, 4, 8, 8] + [16] * 8 + [32, 32]
FULL_STRIDES = [4, 4, 8, 8] + [16] * 18 + [32, 32]


def _check_block_shapes(features, encoder, batch: int, height: int, width: int) -> None:
    assert features.block_strides == list(encoder.block_strides)
    assert len(features.blocks) == len(encoder.block_strides)
    for block, stride, channels in zip(features.blocks, features.block_strides, encoder.block_dims()):
        assert block.shape == (batch, channels, math.ceil(height / stride), math.ceil(width / stride))
        assert torch.isfinite(block).all()
    assert features.embedding.shape == (batch, encoder.embed_dim)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_encoder("unicl_swin_tiny")


@pytest.fixture(scope="module")
def full():
    torch.manual_seed(0)
    return build_encoder("unicl_swin_b")


@pytest.fixture(scope="module")
def probe():
    """One small image and two prompts shared by the output comparisons."""
    generator = torch.Generator().manual_seed(1)
    return torch.randn(1, 3, 224, 224, generator=generator), tokenize(["a photo of a dog.", "a clean origami cat."])


@pytest.fixture(scope="module")
def full_outputs(full, probe):
    image, tokens = probe
    with torch.no_grad():
        return full.encode_image(image), full.encode_text(tokens)


@pytest.fixture(scope="module")
def full_checkpoint(full, tmp_path_factory):
    path = tmp_path_factory.mktemp("unicl") / "in21k_yfcc14m_swin_base.pth"
    save_unicl(full, path, extra={"epoch": 3})
    return path


@pytest.fixture(scope="module")
def tiny_checkpoint(tiny, tmp_path_factory):
    path = tmp_path_factory.mktemp("unicl_tiny") / "tiny.pth"
    demo = {"version": 2, "seed": 7, "tag": b"v2", "score": np.float64(0.5)}
    save_unicl(tiny, path, extra={"demo": demo, "curve": np.arange(3)})
    return path


# --------------------------------------------------------------------------- architecture and shapes


def test_parameter_counts(tiny, full):
    assert sum(p.numel() for p in full.parameters()) == 150_695_609  # UNICL_FACTS §0
    assert sum(p.numel() for p in tiny.parameters()) == 5_787_211  # demo budget: <= 6M


def test_built_frozen_and_stays_in_eval(tiny):
    assert not any(p.requires_grad for p in tiny.parameters())
    tiny.train()
    assert not tiny.training and not tiny.image_encoder.training


def test_stage_blocks(tiny, full):
    assert tiny.stage_blocks(tiny.grid_stride) == list(range(4, 12))
    assert len(full.stage_blocks(16)) == 18
    assert full.block_dims()[:5] == [128, 128, 256, 256, 512]
    with pytest.raises(ValueError, match="strides of this encoder"):
        tiny.stage_blocks(64)


@pytest.mark.parametrize("size", [(224, 224), (512, 384), (500, 333)])
def test_tiny_block_shapes_any_size(tiny, size):
    with torch.no_grad():
        features = tiny.encode_image(torch.randn(2, 3, *size))
    assert features.block_strides == TINY_STRIDES
    _check_block_shapes(features, tiny, 2, *size)


def test_full_block_shapes_224_and_512x384(full, full_outputs):
    _check_block_shapes(full_outputs[0], full, 1, 224, 224)
    assert full_outputs[0].block_strides == FULL_STRIDES
    with torch.no_grad():
        features = full.encode_image(torch.randn(1, 3, 512, 384))
    _check_block_shapes(features, full, 1, 512, 384)
    assert features.blocks[-1].shape[-2:] == (16, 12)


@pytest.mark.parametrize("size", [(224, 224), (512, 384), (320, 448)])
def test_tiny_equals_timm_built_at_that_size(tiny, size):
    """Where timm can run a size (every stage map >= the window), our forward is timm's exactly."""
    config = UNICL_SWIN_TINY
    reference = SwinTransformer(
        img_size=size, num_classes=0, embed_dim=config.swin_embed_dim, depths=config.swin_depths,
        num_heads=config.swin_heads, window_size=swin.WINDOW_SIZE,
    ).eval()  # fmt: skip
    reference.load_state_dict(tiny.image_encoder.state_dict())
    images = torch.randn(1, 3, *size)
    with torch.no_grad():
        expected = reference.forward_features(images)  # (1, h, w, C) after the final norm
        blocks, pooled = tiny.image_encoder.encode(images)
        ours = tiny.image_encoder.norm(blocks[-1].permute(0, 2, 3, 1))
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(pooled, expected.mean(dim=(1, 2)), rtol=0, atol=1e-5)


def test_padding_is_cropped_and_embedding_pools_valid_region(tiny):
    """A 200x200 input is padded to 224: maps are cropped to ceil(200 / s), pooling skips padded tokens."""
    images = torch.randn(1, 3, 200, 200)
    with torch.no_grad():
        features = tiny.encode_image(images)
        padded = tiny.encode_image(torch.nn.functional.pad(images, (0, 24, 0, 24)))
    last = features.blocks[-1]
    assert last.shape[-2:] == (7, 7) == padded.blocks[-1].shape[-2:]  # ceil(200 / 32) = 7
    torch.testing.assert_close(last, padded.blocks[-1])  # same padded computation
    for block, full_block in zip(features.blocks, padded.blocks):
        height = block.shape[-2]
        torch.testing.assert_close(block, full_block[..., :height, :height])


def test_small_maps_get_one_unshifted_window_per_dimension(tiny):
    """Stage maps smaller than 7: the window spans them, no shift, bias read from the 13x13 table."""
    plan = tiny.image_encoder.layouts((96, 160), torch.device("cpu"))
    stage3_shifted, stage4_shifted = plan[2][1], plan[3][1]
    assert stage3_shifted.grid == (6, 10) and stage3_shifted.window == (6, 7) and stage3_shifted.shift == (0, 3)
    assert stage3_shifted.mask is not None and stage3_shifted.mask.shape == (2, 42, 42)
    assert stage4_shifted.grid == (3, 5) and stage4_shifted.window == (3, 5) and stage4_shifted.shift == (0, 0)
    assert stage4_shifted.mask is None
    centre = (swin.WINDOW_SIZE - 1) * (2 * swin.WINDOW_SIZE - 1) + swin.WINDOW_SIZE - 1
    assert (stage4_shifted.bias_index.diagonal() == centre).all()
    with torch.no_grad():
        features = tiny.encode_image(torch.randn(1, 3, 96, 160))
    _check_block_shapes(features, tiny, 1, 96, 160)


def test_window_layouts_are_cached_per_shape(tiny, monkeypatch):
    built = []
    original = swin.window_layout
    monkeypatch.setattr(swin, "window_layout", lambda *args: built.append(args) or original(*args))
    images = torch.randn(1, 3, 288, 352)
    with torch.no_grad():
        tiny.encode_image(images)
        first = len(built)
        tiny.encode_image(images)
        tiny.encode_image(images[..., :350])  # pads to the same 288 x 352
    assert first == 2 * len(UNICL_SWIN_TINY.swin_depths)  # one layout per stage and block kind
    assert len(built) == first  # nothing rebuilt for the same padded shape


# --------------------------------------------------------------------------- Grad-CAM leaf


@pytest.mark.parametrize("size", [(224, 224), (250, 333)])
def test_grad_block_gives_gradients_at_that_block_only(tiny, size):
    images = torch.randn(1, 3, *size)
    target = tiny.stage_blocks(16)[-1]
    with torch.no_grad():
        plain = tiny.encode_image(images)
    features = tiny.encode_image(images, grad_block=target)
    leaf = features.blocks[target]
    assert leaf.is_leaf and leaf.requires_grad
    assert not any(block.requires_grad for block in features.blocks[:target])
    assert all(block.requires_grad for block in features.blocks[target + 1 :])
    torch.testing.assert_close(features.embedding, plain.embedding, rtol=0, atol=1e-6)
    (grad,) = torch.autograd.grad(features.embedding.square().sum(), leaf)
    assert grad.shape == leaf.shape and grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in tiny.parameters())


def test_grad_block_works_inside_no_grad_and_no_graph_without_it(tiny):
    images = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        plain = tiny.encode_image(images)
        features = tiny.encode_image(images, grad_block=5)
    assert plain.embedding.grad_fn is None and not any(block.requires_grad for block in plain.blocks)
    assert features.embedding.requires_grad
    (grad,) = torch.autograd.grad(features.embedding.sum(), features.blocks[5])
    assert grad.abs().sum() > 0
    with pytest.raises(ValueError, match="out of range"):
        tiny.encode_image(images, grad_block=len(tiny.block_strides))


# --------------------------------------------------------------------------- text tower


def test_text_feature_is_read_at_first_eot(tiny):
    """Causal mask + argmax pooling: what follows the end-of-text token does not matter."""
    tokens = tokenize(["a clean origami dog."])
    eot_padded = tokens.clone()
    eot_padded[0, int(tokens[0].argmax()) + 1 :] = EOT_TOKEN_ID
    with torch.no_grad():
        features = tiny.encode_text(torch.cat([tokens, eot_padded]))
    assert features.shape == (2, tiny.embed_dim)
    torch.testing.assert_close(features[0], features[1])
    torch.testing.assert_close(tiny.logit_multiplier(), torch.tensor(math.e))
    with pytest.raises(ValueError, match="shape"):
        tiny.encode_text(tokens[:, :10])


# --------------------------------------------------------------------------- published layout


def test_saved_full_checkpoint_has_the_published_keys_and_shapes(full, full_checkpoint):
    reference = json.loads(REFERENCE.read_text())
    assert len(reference) == 513
    expected = {key: list(value.shape) for key, value in published_state_dict(full).items()}
    assert expected == reference
    written = safe_load(full_checkpoint)
    assert written["epoch"] == 3
    assert {key: list(value.shape) for key, value in written["model"].items()} == reference
    index = written["model"]["image_encoder.layers.0.blocks.0.attn.relative_position_index"]
    assert index.dtype == torch.int64 and torch.equal(index, get_relative_position_index(7, 7))
    mask = written["model"]["image_encoder.layers.2.blocks.17.attn_mask"]
    assert set(mask.unique().tolist()) == {0.0, -100.0}


def test_full_round_trip_loads_strictly_and_reproduces_outputs(full, full_checkpoint, full_outputs, probe):
    image, tokens = probe
    loaded = build_encoder("unicl_swin_b", checkpoint=full_checkpoint)
    with torch.no_grad():
        features, text = loaded.encode_image(image), loaded.encode_text(tokens)
    expected_features, expected_text = full_outputs
    assert torch.equal(features.embedding, expected_features.embedding)
    assert all(torch.equal(a, b) for a, b in zip(features.blocks, expected_features.blocks))
    assert torch.equal(text, expected_text)
    assert torch.equal(loaded.logit_multiplier(), full.logit_multiplier())


def test_tiny_round_trip_returns_extra_entries_and_half_storage(tiny, tiny_checkpoint, probe, tmp_path):
    image, tokens = probe
    loaded = build_encoder("unicl_swin_tiny")
    extra = load_unicl(tiny_checkpoint, loaded)
    assert extra["demo"] == {"version": 2, "seed": 7, "tag": b"v2", "score": np.float64(0.5)}
    assert type(extra["demo"]["score"]) is np.float64 and np.array_equal(extra["curve"], np.arange(3))
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(image).embedding, tiny.encode_image(image).embedding)
        assert torch.equal(loaded.encode_text(tokens), tiny.encode_text(tokens))
    half = tmp_path / "half.pth"
    save_unicl(tiny, half, half=True)
    assert safe_load(half)["model"]["image_projection"].dtype == torch.float16
    load_unicl(half, loaded)
    assert loaded.image_projection.dtype == torch.float32
    torch.testing.assert_close(loaded.image_projection, tiny.image_projection, rtol=1e-3, atol=1e-4)


def test_bare_state_dict_with_module_prefix_loads(tiny, tiny_checkpoint, tmp_path):
    state = safe_load(tiny_checkpoint)["model"]
    path = tmp_path / "ddp.pth"
    torch.save({f"module.{key}": value for key, value in state.items()}, path)
    loaded = build_encoder("unicl_swin_tiny", checkpoint=path)
    assert torch.equal(loaded.logit_scale, tiny.logit_scale)


# --------------------------------------------------------------------------- strict errors


def _edited(tiny_checkpoint: Path, tmp_path: Path, edit) -> Path:
    container = safe_load(tiny_checkpoint)
    edit(container["model"])
    path = tmp_path / "edited.pth"
    torch.save(container, path)
    return path


def _error(path, name="unicl_swin_tiny") -> str:
    with pytest.raises(CheckpointError) as info:
        build_encoder(name, checkpoint=path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    return message


def test_shape_mismatch_names_key_and_both_shapes(tiny_checkpoint, tmp_path):
    path = _edited(tiny_checkpoint, tmp_path, lambda sd: sd.update(image_projection=torch.zeros(256, 64)))
    message = _error(path)
    assert "1 shape mismatches [image_projection: file (256, 64) vs model (256, 128)]" in message
    assert "hint: wrong file, or wrong encoder name" in message


def test_missing_and_unexpected_keys_are_named(tiny_checkpoint, tmp_path):
    def edit(state):
        del state["text_encoder.ln_final.weight"]
        state["image_encoder.head.fc.weight"] = torch.zeros(3)

    message = _error(_edited(tiny_checkpoint, tmp_path, edit))
    assert "1 missing [text_encoder.ln_final.weight]" in message
    assert "1 unexpected [image_encoder.head.fc.weight]" in message


def test_wrong_encoder_name_lists_at_most_five_keys(full, tiny_checkpoint):
    with pytest.raises(CheckpointError) as info:
        load_unicl(tiny_checkpoint, full)
    message = str(info.value)
    assert "\n" not in message and "missing [" in message and "(checked against 'unicl_swin_b')" in message
    listed = message.split("shape mismatches [")[1].split("]")[0]
    assert listed.count(" vs model ") == 5 and listed.endswith(", ...")


def test_truncated_and_garbage_files_give_one_line_errors(tiny_checkpoint, tmp_path):
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(tiny_checkpoint.read_bytes()[: tiny_checkpoint.stat().st_size // 2])
    assert "cannot read checkpoint" in _error(truncated)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all")
    assert "cannot read checkpoint" in _error(garbage)
    assert "not found" in _error(tmp_path / "absent.pth")


# --------------------------------------------------------------------------- restricted unpickler

EXECUTED: list[str] = []
FAKE_MODULE = "affseg_test_fake_yacs_config"


def _side_effect(message: str) -> str:
    EXECUTED.append(message)
    return message


class _Trap:
    """Unpickling this with plain pickle calls ``_side_effect``."""

    def __reduce__(self):
        return _side_effect, ("trap executed",)


def _fake_yacs_module() -> types.ModuleType:
    module = types.ModuleType(FAKE_MODULE)

    class CfgNode(dict):  # like yacs: a dict subclass whose unpickling runs its own code
        def __setstate__(self, state):
            EXECUTED.append("CfgNode.__setstate__")

    CfgNode.__module__, CfgNode.__qualname__ = FAKE_MODULE, "CfgNode"
    module.CfgNode = CfgNode
    return module


def test_restricted_unpickler_never_imports_or_runs_foreign_code(tiny, tiny_checkpoint, tmp_path, monkeypatch):
    module = _fake_yacs_module()
    config = module.CfgNode(MODEL={"NAME": "unicl"}, TRAIN={"EPOCHS": 32})
    config.__dict__["__immutable__"] = True
    monkeypatch.setitem(sys.modules, FAKE_MODULE, module)
    path = tmp_path / "with_config.pth"
    torch.save({"model": safe_load(tiny_checkpoint)["model"], "config": config, "trap": _Trap()}, path)
    EXECUTED.clear()
    monkeypatch.delitem(sys.modules, FAKE_MODULE)  # a plain unpickler would now have to import it

    loaded = build_encoder("unicl_swin_tiny")
    extra = load_unicl(path, loaded)
    assert EXECUTED == [] and FAKE_MODULE not in sys.modules
    assert isinstance(extra["config"], Unpickled)
    assert (extra["config"].module, extra["config"].qualname) == (FAKE_MODULE, "CfgNode")
    assert extra["config"]["TRAIN"] == {"EPOCHS": 32}  # the content is still readable, as plain data
    assert isinstance(extra["trap"], Unpickled) and extra["trap"].qualname == "_side_effect"
    assert torch.equal(loaded.image_projection, tiny.image_projection)

    # control: the same file through plain unpickling does run the trap
    monkeypatch.setitem(sys.modules, FAKE_MODULE, module)
    torch.load(path, weights_only=False)
    assert "trap executed" in EXECUTED
