"""Background, pseudo-labels (absent classes, ignore band) and the refine_cams chain."""

from __future__ import annotations

import torch

from affseg.config import ParConfig, RefineConfig
from affseg.data.classes import IGNORE_INDEX
from affseg.refine.pseudo import add_background, pseudo_labels, refine_cams
from affseg.refine.random_walk import box_masks


def test_add_background_power_and_constant():
    fg = torch.tensor([[[[0.2, 0.9]], [[0.5, 0.1]]]])  # (1, 2, 1, 2)
    power = add_background(fg, RefineConfig(bg_power=2.0))
    assert torch.allclose(power[0, 0], torch.tensor([[0.25, 0.01]]))  # (1 − 0.5)², (1 − 0.9)²
    assert torch.equal(power[:, 1:], fg)
    constant = add_background(fg, RefineConfig(background="constant", bg_score=0.45))
    assert torch.allclose(constant[0, 0], torch.full((1, 2), 0.45))


CELL = 16  # pixels per grid cell: the maps below are stride-16 grid maps (SPEC §5.1)


def _images(height: int, width: int) -> torch.Tensor:
    return torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(0))


def test_absent_classes_never_chosen():
    maps = torch.zeros(1, 20, 4, 4)
    maps[0, 5] = 100.0  # absent, huge
    maps[0, 3, :2] = 1.0  # present class 3 on the top half
    labels = torch.zeros(1, 20)
    labels[0, 3] = 1
    for use_par in (False, True):  # a 4×4 grid covers a 64×64 image (stride 16)
        out = pseudo_labels(maps, labels, _images(64, 64), RefineConfig(), use_par=use_par)
        assert out.shape == (1, 64, 64)
        assert set(out.unique().tolist()) == {0, 4}  # background and VOC index 3 + 1
    plain = pseudo_labels(maps, labels, _images(64, 64), RefineConfig(), use_par=False)
    assert (plain[0, :24] == 4).all() and (plain[0, 40:] == 0).all()


def test_argmax_over_present_classes_in_voc_space():
    maps = torch.zeros(2, 20, 2, 2)
    maps[0, 0, 0, 0] = maps[0, 19, 1, 1] = 1.0
    maps[1, 7, 0, :] = 1.0
    labels = torch.zeros(2, 20)
    labels[0, [0, 19]] = 1
    labels[1, 7] = 1
    out = pseudo_labels(maps, labels, _images(32, 32).repeat(2, 1, 1, 1), RefineConfig(), use_par=False)
    centres = out[:, CELL // 2::CELL, CELL // 2::CELL]  # the pixel at each cell's centre
    assert centres[0].tolist() == [[1, 0], [0, 20]]
    assert centres[1].tolist() == [[8, 8], [0, 0]]


def test_ignore_band():
    maps = torch.zeros(1, 20, 1, 5)
    maps[0, 2, 0] = torch.tensor([0.0, 0.1, 0.5, 0.8, 1.0])
    labels = torch.zeros(1, 20)
    labels[0, 2] = 1
    cfg = RefineConfig(ignore_band=True, low_threshold=0.25, high_threshold=0.7)
    probe = CELL // 2 - 1  # just left of each cell's centre: cell 2 reads 0.4875 there, bg 0.5125
    out = pseudo_labels(maps, labels, _images(CELL, 5 * CELL), cfg, use_par=False)
    assert out[0, probe, probe::CELL].tolist() == [0, 0, IGNORE_INDEX, 3, 3]
    off = pseudo_labels(maps, labels, _images(CELL, 5 * CELL), RefineConfig(), use_par=False)
    assert off[0, probe, probe::CELL].tolist() == [0, 0, 0, 3, 3]  # 0.4875 < bg 0.5125: background


def test_ignore_band_after_par_uses_unscaled_scores():
    maps = torch.full((1, 20, 8, 8), 0.3)
    maps[0, 4, :, :4] = 0.69  # left half, just under high_threshold 0.7
    maps[0, 4, 0, 7], maps[0, 4, 7, 7] = 1.0, 0.0  # min-max keeps 0.69 as it is
    labels = torch.zeros(1, 20)
    labels[0, 4] = 1
    image = torch.zeros(1, 3, 8, 8)
    image[..., 4:] = 1.0  # a colour edge keeps the right half's values out of the left
    cfg = RefineConfig(ignore_band=True, par=ParConfig(iterations=3))
    out = pseudo_labels(maps, labels, image, cfg, use_par=True)
    # PAR grew 0.69 to ≈ 0.69 · 1.01³ ≈ 0.711, over 0.7; the band reads it back at ≈ 0.69
    assert (out[0, :, :3] == IGNORE_INDEX).all()


def test_image_without_classes_is_background():
    out = pseudo_labels(torch.rand(1, 20, 3, 3), torch.zeros(1, 20), _images(6, 6), RefineConfig(), use_par=True)
    assert torch.equal(out, torch.zeros(1, 6, 6, dtype=torch.long))


def _cams() -> torch.Tensor:
    cams = torch.zeros(1, 20, 3, 3)
    cams[0, 1] = torch.tensor([[1.0, 0.5, 0.0], [0.2, 0.1, 0.0], [0.0, 0.0, 0.0]])
    cams[0, 6] = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.3, 0.6], [0.0, 0.9, 1.0]])
    return cams


def test_refine_cams_identity_affinity_gives_boxed_cams():
    cams = _cams()
    identity = torch.eye(9).expand(1, 8, 9, 9)
    for aff_dec in (None, torch.full((1, 9, 9), 0.7)):
        out = refine_cams(cams, identity, aff_dec, RefineConfig())
        assert torch.allclose(out, cams * box_masks(cams, 0.4), atol=1e-6)
        absent = [k for k in range(20) if k not in (1, 6)]
        assert torch.equal(out[0, absent], torch.zeros(18, 3, 3))


def test_refine_cams_warmup_uses_last_blocks_only():
    cams = _cams()
    generator = torch.Generator().manual_seed(0)
    useful = torch.rand(1, 8, 9, 9, generator=generator)
    junk = torch.full((1, 4, 9, 9), 1e6)  # earlier blocks: must not be used
    cfg = RefineConfig()
    with_junk = refine_cams(cams, torch.cat([junk, useful], dim=1), None, cfg)
    assert torch.allclose(with_junk, refine_cams(cams, useful, None, cfg))


def test_refine_cams_with_decoder_uses_last_n0():
    cams = _cams()
    generator = torch.Generator().manual_seed(1)
    aff_enc = torch.rand(1, 10, 9, 9, generator=generator)
    aff_dec = torch.rand(1, 9, 9, generator=generator).requires_grad_(True)
    cfg = RefineConfig(n0=6)
    out = refine_cams(cams, aff_enc, aff_dec, cfg)
    changed = aff_enc.clone()
    changed[:, :4] = 5.0
    assert torch.allclose(out, refine_cams(cams, changed, aff_dec, cfg))
    assert not out.requires_grad
