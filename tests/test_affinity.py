"""Encoder/decoder affinities, layer selection and combination on constructed matrices."""

from __future__ import annotations

import math

import torch

from affseg.refine.affinity import combine_affinities, decoder_affinity, encoder_affinities, select_layers


def test_encoder_affinities_cosine_clamped():
    # tokens (1, 0), (0, 2), (−3, 0), (1, 1) on a 2×2 grid
    block = torch.tensor([[1.0, 0.0, -3.0, 1.0], [0.0, 2.0, 0.0, 1.0]]).view(1, 2, 2, 2)
    wide = torch.cat([block, torch.zeros(1, 3, 2, 2)], dim=1)  # extra zero channels: same cosines
    out = encoder_affinities([block, wide])
    s = 1 / math.sqrt(2)
    expected = torch.tensor(
        [
            [1.0, 0.0, 0.0, s],
            [0.0, 1.0, 0.0, s],
            [0.0, 0.0, 1.0, 0.0],  # cos((−1, 0), (1, 0)) = −1 → 0; with (1, 1) −s → 0
            [s, s, 0.0, 1.0],
        ]
    )
    assert out.shape == (1, 2, 4, 4)
    assert torch.allclose(out[0, 0], expected, atol=1e-6)
    assert torch.allclose(out[0, 1], expected, atol=1e-6)


def test_decoder_affinity_values_and_gradient():
    fused = torch.tensor([1.0, 2.0]).view(1, 1, 1, 2).requires_grad_(True)
    out = decoder_affinity(fused)
    expected = torch.sigmoid(torch.tensor([[1.0, 2.0], [2.0, 4.0]]))
    assert torch.allclose(out[0], expected)
    out.sum().backward()
    assert fused.grad is not None and fused.grad.abs().sum() > 0


def _layers() -> tuple[torch.Tensor, torch.Tensor]:
    """A_f = 0.5 everywhere (N = 2); three layers whose abs and signed deviations disagree."""
    aff_dec = torch.full((1, 2, 2), 0.5)
    wobble = torch.tensor([[0.4, -0.4], [0.4, -0.4]])
    layers = torch.stack([0.5 + wobble, torch.full((2, 2), 0.6), torch.full((2, 2), 0.2)])
    return aff_dec, layers[None]


def test_select_layers_abs_and_signed_differ():
    aff_dec, layers = _layers()
    # abs: S = [1.6, 0.4, 1.2], mean 1.067 → keep layer 1 only
    assert select_layers(aff_dec, layers, "abs").tolist() == [[False, True, False]]
    # signed: S = [0, −0.4, 1.2], mean 0.267 → keep layers 0 and 1
    assert select_layers(aff_dec, layers, "signed").tolist() == [[True, True, False]]


def test_signed_selection_ignores_decoder_affinity():
    generator = torch.Generator().manual_seed(0)
    layers = torch.rand(1, 6, 9, 9, generator=generator)
    choices = set()
    for _ in range(5):
        aff_dec = torch.rand(1, 9, 9, generator=generator) * torch.rand(1, generator=generator) * 3
        choices.add(tuple(select_layers(aff_dec, layers, "signed")[0].tolist()))
    assert len(choices) == 1
    # the ordering of S over layers is the ordering of −ΣA^l, whatever A_f is
    order = torch.argsort(-layers.sum(dim=(-2, -1)), dim=1)
    aff_dec = torch.rand(1, 9, 9, generator=generator)
    scores = aff_dec.sum() - layers.sum(dim=(-2, -1))
    assert torch.equal(torch.argsort(scores, dim=1), order)


def test_select_layers_per_image():
    aff_dec, layers = _layers()
    batch_dec = torch.cat([aff_dec, torch.full((1, 2, 2), 0.2)])
    batch_layers = torch.cat([layers, layers])
    keep = select_layers(batch_dec, batch_layers, "abs")
    # image 1: A_f = 0.2 → S = [1.6, 1.6, 0] → mean 1.067 → keep layer 2
    assert keep.tolist() == [[False, True, False], [False, False, True]]


def test_combine_affinities():
    aff_dec, layers = _layers()
    layers = torch.cat([layers, layers])
    aff_dec = torch.cat([aff_dec, aff_dec])
    keep = torch.tensor([[False, True, True], [False, False, False]])
    out = combine_affinities(aff_dec, layers, keep)
    assert torch.allclose(out[0], 0.5 * torch.full((2, 2), 0.4))  # mean(0.6, 0.2) · 0.5
    assert torch.allclose(out[1], 0.5 * layers[1].mean(dim=0))  # nothing kept → all layers
    assert torch.allclose(combine_affinities(None, layers), layers.mean(dim=1))


def test_signed_deviation_sums_elementwise_differences():
    """SPEC §5.1: S^l = Σ(A_f − A^l) in float32, never ΣA_f − ΣA^l (which keeps other layers here)."""
    grid_cells = 400  # a 20×20 grid, as on VOC-sized crops
    generator = torch.Generator().manual_seed(0)
    base = torch.rand(1, grid_cells, grid_cells, generator=generator)
    noise = 1e-6 * torch.randn(1, 4, grid_cells, grid_cells, generator=generator)
    aff_enc = (base.unsqueeze(1) + noise).clamp(0, 1)  # four nearly identical layers
    aff_dec = torch.rand(1, grid_cells, grid_cells, generator=generator)
    elementwise = (aff_dec.unsqueeze(1) - aff_enc).sum(dim=(-2, -1))
    difference_of_sums = aff_dec.sum(dim=(-2, -1)).unsqueeze(1) - aff_enc.sum(dim=(-2, -1))
    expected = elementwise <= elementwise.mean(dim=1, keepdim=True)
    assert not torch.equal(expected, difference_of_sums <= difference_of_sums.mean(dim=1, keepdim=True))
    assert torch.equal(select_layers(aff_dec, aff_enc, "signed"), expected)
