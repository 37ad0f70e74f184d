"""Issue 13: each hot-path replacement equals the implementation it replaced (`hot_path_reference.py`)."""

from __future__ import annotations

import sys

import pytest
import torch
from hot_path_reference import (reference_component_labels, reference_encoder_affinities, reference_window_attention,
                                snake_mask)

from affseg.backbones.swin import SwinImageEncoder, window_attention
from affseg.refine.affinity import encoder_affinities
from affseg.refine.random_walk import _component_labels, checked_box_masks

WALK_MODULE = sys.modules[_component_labels.__module__]  # `affseg.refine.random_walk` is also a function's name

ATTENTION_TOLERANCE = 1e-5  # issue 13: fp32; the fused kernel sums QKᵀ and the softmax in another order


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


def test_batched_encoder_affinities_equal_the_per_block_loop():
    torch.manual_seed(0)
    blocks = [torch.randn(2, 16, 5, 6), torch.randn(2, 16, 5, 6), torch.randn(2, 24, 5, 6)]  # mixed widths
    torch.testing.assert_close(encoder_affinities(blocks), reference_encoder_affinities(blocks), atol=1e-6, rtol=0)


@pytest.mark.parametrize("grid", [(14, 14), (28, 28), (5, 9)])
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
