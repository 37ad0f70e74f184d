"""SegDecoder: shapes, resizing of other-stride blocks, gradients only in the decoder."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from affseg.decoder import SegDecoder

TINY = {"dim": 16, "mlp_dim": 8, "depth": 2, "heads": 2, "mlp_ratio": 4.0, "dropout": 0.1}


def test_shapes_and_images_do_not_interact():
    torch.manual_seed(0)
    decoder = SegDecoder([6, 10], **TINY).eval()
    blocks = [torch.randn(2, 6, 4, 5), torch.randn(2, 10, 4, 5)]
    logits, fused = decoder(blocks, (64, 80))
    assert logits.shape == (2, 21, 64, 80)
    assert fused.shape == (2, 16, 4, 5)
    single, _ = decoder([b[:1] for b in blocks], (64, 80))
    assert torch.allclose(single[0], logits[0], atol=1e-5)


def test_blocks_off_the_grid_are_refused():
    decoder = SegDecoder([6, 10], **TINY)
    with pytest.raises(ValueError, match="share one grid"):
        decoder([torch.randn(1, 6, 4, 5), torch.randn(1, 10, 2, 3)], (64, 80))


def test_gradients_reach_only_decoder():
    torch.manual_seed(0)
    encoder = nn.Conv2d(3, 6, kernel_size=16, stride=16).requires_grad_(False)
    decoder = SegDecoder([6, 6], **TINY)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        block = encoder(images)
    logits, fused = decoder([block, block * 2], (64, 64))
    (logits.square().mean() + fused.mean()).backward()
    assert all(p.grad is None for p in encoder.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in decoder.parameters())
    assert not block.requires_grad
