"""Multi-stage features (SPEC §5.3): block selection by stage, stage maps on the stride-16 grid, and
training with several stages on the demo set and on a set whose image sizes are not multiples of 16."""

from __future__ import annotations

import pytest
import torch
from test_train import tiny_config

from affseg.backbones.registry import build_encoder
from affseg.config import ConfigError
from affseg.data.demo import DemoSpec, make_demo
from affseg.grid import stage_to_grid
from affseg.method.build import blocks_of_stages, build_teacher
from affseg.train import train

HEIGHT, WIDTH = 100, 70  # grid ceil(100/16) × ceil(70/16) = 7 × 5
GRID = (7, 5)
ODD_SIZE = 120  # demo images of 120 px: not a multiple of 16


@pytest.mark.parametrize("stride", [4, 8, 16, 32])
def test_stage_maps_land_on_the_grid(stride):
    rows, cols = -(-HEIGHT // stride), -(-WIDTH // stride)
    block = torch.randn(2, 3, rows, cols)
    out = stage_to_grid(block, stride, GRID)
    assert out.shape == (2, 3, *GRID)
    if stride == 16:
        assert torch.equal(out, block)


def test_finer_stages_average_each_cells_window_and_only_the_map_part_of_the_last():
    block = torch.arange(25 * 18, dtype=torch.float32).view(1, 1, 25, 18)  # stride 4 of 100 × 70
    out = stage_to_grid(block, 4, GRID)
    assert out[0, 0, 0, 0] == block[0, 0, :4, :4].mean()
    assert out[0, 0, 6, 4] == block[0, 0, 24:, 16:].mean()  # the last window reaches past the map


def test_coarser_stages_are_upsampled_by_two_then_cropped():
    block = torch.randn(1, 2, 4, 3)  # stride 32 of 100 × 70
    expected = torch.nn.functional.interpolate(block, scale_factor=2, mode="bilinear", align_corners=False)
    assert torch.equal(stage_to_grid(block, 32, GRID), expected[..., :7, :5])


def test_blocks_of_stages_in_encoder_order():
    encoder = build_encoder("unicl_swin_tiny")
    strides = encoder.block_strides
    chosen = blocks_of_stages(encoder, [3, 2], "decoder_stages")
    assert chosen == sorted(chosen)
    assert [strides[i] for i in chosen] == [8] * strides.count(8) + [16] * strides.count(16)


def test_a_vit_has_only_stage_three(small_demo, tmp_path):
    config = tiny_config(small_demo, tmp_path, "model.encoder=clip_vit_tiny", "model.checkpoint=random",
                         "model.decoder_stages=[2,3]")
    with pytest.raises(ConfigError, match=r"model.decoder_stages: stage\(s\) \[2\] not in this encoder \(its stages: \[3\]\)"):
        build_teacher(config)


def test_teacher_features_come_from_the_listed_stages(small_demo, tmp_path):
    config = tiny_config(small_demo, tmp_path, "model.decoder_stages=[2,3,4]", "model.affinity_stages=[3,4]",
                         "refine.n0=2", "refine.warmup_blocks=2")
    teacher = build_teacher(config)
    strides = teacher.encoder.block_strides
    assert sorted({strides[i] for i in teacher.decoder_blocks}) == [8, 16, 32]
    assert [strides[i] for i in teacher.affinity_blocks] == [32, 32]  # the last n0 = 2 of stages 3 and 4
    images, labels = torch.randn(2, 3, HEIGHT, WIDTH), torch.zeros(2, 20)
    labels[:, 4] = 1
    out = teacher(images, labels)
    assert all(feature.shape[-2:] == GRID for feature in out.features)
    assert out.aff_enc.shape == (2, 2, GRID[0] * GRID[1], GRID[0] * GRID[1])


@pytest.mark.parametrize("odd_sizes", [False, True], ids=["demo", "120px"])
def test_multi_stage_training_trains_and_validates(small_demo, tmp_path, odd_sizes):
    root = make_demo(tmp_path / "odd", DemoSpec(seed=5, train=8, val=3, test=1, size=ODD_SIZE)) if odd_sizes \
        else small_demo
    config = tiny_config(root, tmp_path / "run", "model.decoder_stages=[2,3,4]", "model.affinity_stages=[3,4]",
                         "train.iterations=2", "train.val_interval=2")
    result = train(config)
    assert result.best is not None and 0.0 <= result.best.miou <= 1.0
    assert set(result.best.pseudo) == {"cam", "cam_par", "refined"}


def test_the_stages_space_parses_its_string_choices_into_lists():
    from affseg.sweep.space import load_space

    spec = load_space("stages", "demo")
    choices = {p.key: p.choices for p in spec.parameters}
    assert choices["model.decoder_stages"] == ("3", "2,3", "2,3,4")
    config = spec.trial_config({"model.decoder_stages": "2,3,4", "model.affinity_stages": "3,4", "refine.alpha": 2})
    assert config.model.decoder_stages == [2, 3, 4] and config.model.affinity_stages == [3, 4]
