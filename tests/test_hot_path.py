"""Issue 13: each hot-path replacement equals the implementation it replaced (`hot_path_reference.py`)."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F
from hot_path_reference import (reference_component_labels, reference_encoder_affinities, reference_par,
                                reference_par_kernel, reference_propagate, reference_window_attention, snake_mask)

from affseg.backbones.swin import SwinImageEncoder, attention_mask, window_attention
from affseg.config import ParConfig
from affseg.refine.affinity import encoder_affinities
from affseg.refine.par import image_kernel, par, par_kernel
from affseg.refine.random_walk import _component_labels, checked_box_masks

WALK_MODULE = sys.modules[_component_labels.__module__]  # `affseg.refine.random_walk` is also a function's name
PAR_MODULE = sys.modules[par.__module__]  # and so is `affseg.refine.par`

ATTENTION_TOLERANCE = 1e-5  # issue 13: fp32; the fused kernel sums QKᵀ and the softmax in another order
PAR_TOLERANCE = 1e-5  # issue 13: maps grow to ~1.2 over 20 iterations; reordering alone moves them by ~3e-6
KERNEL_TOLERANCE = 5e-6  # κ ≤ 1 + w2; the two sum σ in another order, and next to a flat patch (σ ≈ 0 on one
# side) the logits reach the hundreds, where a last-bit change of a logit moves κ by ~2e-6


@pytest.mark.parametrize("grid", [(14, 14), (9, 12), (5, 7)])  # multiple of the window, padded, one small window
def test_sdpa_window_attention_equals_explicit_softmax(grid):
    torch.manual_seed(0)
    encoder = SwinImageEncoder(embed_dim=32, depths=(2,), num_heads=(4,)).eval()
    with torch.no_grad():
        for block in encoder.layers[0].blocks:  # a bias table far from its zero-ish init
            block.attn.relative_position_bias_table.normal_(std=1.0)
        layouts = encoder.layouts((grid[0] * 4, grid[1] * 4), torch.device("cpu"))[0]
        x = torch.randn(2, *grid, 32)
        for block, layout in zip(encoder.layers[0].blocks, layouts):  # unshifted, then shifted
            expected = reference_window_attention(block, x, layout)
            torch.testing.assert_close(window_attention(block, x, layout), expected, atol=ATTENTION_TOLERANCE, rtol=0)
    assert any(layout.mask is not None for layout in layouts) or min(grid) <= 7


def test_sdpa_window_attention_gradient_equals_explicit_softmax():
    """Grad-CAM back-propagates through the attention: the gradients agree too."""
    torch.manual_seed(1)
    encoder = SwinImageEncoder(embed_dim=32, depths=(2,), num_heads=(4,)).eval()
    block, layout = encoder.layers[0].blocks[1], encoder.layouts((56, 56), torch.device("cpu"))[0][1]
    grads = []
    for attend in (window_attention, reference_window_attention):
        x = torch.randn(2, 14, 14, 32, generator=torch.Generator().manual_seed(2), requires_grad=True)
        (grad,) = torch.autograd.grad(attend(block, x, layout).square().sum(), x)
        grads.append(grad)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-5)


def test_cached_attention_mask_follows_a_bias_table_written_in_place():
    """The frozen encoder's bias + shift mask is built once per block and layout, and again after a checkpoint
    load writes the table (in place: same tensor, new version)."""
    torch.manual_seed(3)
    encoder = SwinImageEncoder(embed_dim=32, depths=(2,), num_heads=(4,)).eval().requires_grad_(False)
    block, layout = encoder.layers[0].blocks[1], encoder.layouts((56, 56), torch.device("cpu"))[0][1]
    x = torch.randn(2, 14, 14, 32)
    first = window_attention(block, x, layout)
    assert attention_mask(block.attn, layout, x.dtype) is attention_mask(block.attn, layout, x.dtype)
    state = {k: (torch.randn_like(v) if k.endswith("relative_position_bias_table") else v)
             for k, v in encoder.state_dict().items()}
    encoder.load_state_dict(state)
    second = window_attention(block, x, layout)
    torch.testing.assert_close(second, reference_window_attention(block, x, layout), atol=ATTENTION_TOLERANCE, rtol=0)
    assert not torch.allclose(first, second, atol=1e-3)


def test_batched_encoder_affinities_equal_the_per_block_loop():
    torch.manual_seed(0)
    blocks = [torch.randn(2, 16, 5, 6), torch.randn(2, 16, 5, 6), torch.randn(2, 24, 5, 6)]  # mixed widths
    torch.testing.assert_close(encoder_affinities(blocks), reference_encoder_affinities(blocks), atol=1e-6, rtol=0)


@pytest.mark.parametrize("grid", [(14, 14), (28, 28), (56, 56), (5, 9)])
def test_fixed_budget_components_equal_propagation_until_stable(grid):
    generator = torch.Generator().manual_seed(0)
    random = torch.rand(64, *grid, generator=generator) > torch.rand(64, 1, 1, generator=generator)
    snakes = torch.stack([snake_mask(*grid), snake_mask(*grid).flip(0), snake_mask(*grid).flip(1)])
    masks = torch.cat([random, snakes, torch.zeros(1, *grid, dtype=torch.bool), torch.ones(1, *grid, dtype=torch.bool)])
    labels, converged = _component_labels(masks)
    assert bool(converged)
    assert torch.equal(labels, reference_component_labels(masks))


def test_unconverged_components_are_flagged_and_their_boxes_still_cover_the_cells(monkeypatch):
    monkeypatch.setattr(WALK_MODULE, "component_rounds", lambda height, width: 2)
    snake = snake_mask(14, 14)[None, None].float()
    boxes, converged = checked_box_masks(snake, threshold=0.5)
    assert not bool(converged)
    assert bool(boxes[snake.bool()].all())
    monkeypatch.undo()
    exact, converged = checked_box_masks(snake, threshold=0.5)
    assert bool(converged) and bool(exact[boxes].all())  # the parts' boxes lie inside the component's box


def _par_inputs(size: tuple[int, int], maps: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised-looking images (B = 2) and background + 3 score maps in [0, 1], with flat patches (σ = 0)."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(2, 3, *size, generator=generator)
    images[0, :, : size[0] // 2, : size[1] // 2] = 0.25  # a flat quarter: STD_EPS decides its logits
    return images, torch.rand(2, maps, *size, generator=generator)


@pytest.mark.parametrize("size", [(64, 80), (12, 10)])  # larger than the widest dilation, and smaller than it
def test_par_equals_the_shifted_addcmul_loop(size):
    p = ParConfig()  # six dilations up to 24, 20 iterations
    images, maps = _par_inputs(size)
    new = par(images, maps, p.dilations, p.iterations, p.w1, p.w2)
    torch.testing.assert_close(new, reference_par(images, maps, p.dilations, p.iterations, p.w1, p.w2),
                               atol=PAR_TOLERANCE, rtol=0)


def test_par_kernel_equals_the_neighbour_by_neighbour_kernel():
    p = ParConfig()
    images, _ = _par_inputs((40, 36))
    old = reference_par_kernel(images, p.dilations, p.w1, p.w2)  # (B, P, H, W)
    new = par_kernel(images, p.dilations, p.w1, p.w2)  # (B, H·W, P)
    torch.testing.assert_close(new, old.flatten(2).transpose(1, 2), atol=KERNEL_TOLERANCE, rtol=0)


def test_half_scale_par_equals_the_loop_at_half_size():
    p = ParConfig(scale=0.5)
    images, maps = _par_inputs((48, 40))
    half = (24, 20)
    small = F.interpolate(images, size=half, mode="bilinear", align_corners=False)
    kernel = reference_par_kernel(small, p.dilations, p.w1, p.w2)
    refined = reference_propagate(kernel, F.interpolate(maps, size=half, mode="bilinear", align_corners=False),
                                  p.dilations, p.iterations)
    old = F.interpolate(refined, size=(48, 40), mode="bilinear", align_corners=False)
    new = par(images, maps, p.dilations, p.iterations, p.w1, p.w2, p.scale)
    torch.testing.assert_close(new, old, atol=PAR_TOLERANCE, rtol=0)


def test_par_with_int64_neighbour_rows_equals_int32(monkeypatch):
    p = ParConfig(iterations=3)
    images, maps = _par_inputs((20, 24))
    int32 = image_kernel(images, p.dilations, p.w1, p.w2)
    monkeypatch.setattr(PAR_MODULE, "INT32_ROWS", 0)  # as if N·P did not fit in int32
    int64 = image_kernel(images, p.dilations, p.w1, p.w2)
    assert (int32.neighbours.dtype, int64.neighbours.dtype) == (torch.int32, torch.int64)
    outputs = [par(images, maps, p.dilations, p.iterations, p.w1, p.w2, kernel=k) for k in (int32, int64)]
    assert torch.equal(*outputs)


def test_par_refuses_a_kernel_of_another_size():
    p = ParConfig()
    images, maps = _par_inputs((20, 24))
    kernel = image_kernel(images, p.dilations, p.w1, p.w2, scale=0.5)
    with pytest.raises(ValueError, match="PAR kernel of size"):
        par(images, maps, p.dilations, p.iterations, p.w1, p.w2, kernel=kernel)
