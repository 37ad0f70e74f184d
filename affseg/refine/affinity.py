"""Encoder and decoder affinities, layer selection and their combination (SPEC §2.4 steps 1–4).

All affinities live on the h×w token grid, flattened row-major to N = h·w.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

Deviation = Literal["abs", "signed"]


def encoder_affinities(blocks: list[Tensor]) -> Tensor:
    """Cosine affinities of each block's tokens, clamped at 0 (eqs. 3.8–3.9).

    blocks: K tensors (B, C_k, h, w) sharing h×w (channels may differ).
    Returns (B, K, N, N) with A^k[i, j] = max(0, f̃_iᵀ f̃_j), f̃ = f / ‖f‖₂ over C.
    """
    size = blocks[0].shape[-2:]
    for index, block in enumerate(blocks):
        if block.shape[-2:] != size:
            raise ValueError(f"block {index} has grid {tuple(block.shape[-2:])}, expected {tuple(size)}")
    # One batched matmul for all K blocks: channels are zero-padded to the widest block, which changes
    # neither a token's norm nor a dot product.
    channels = max(block.shape[1] for block in blocks)
    tokens = torch.stack([F.pad(block.flatten(2), (0, 0, 0, channels - block.shape[1])) for block in blocks], dim=1)
    tokens = F.normalize(tokens, dim=2)  # (B, K, C, N)
    return (tokens.transpose(-2, -1) @ tokens).clamp(min=0)


def decoder_affinity(fused: Tensor) -> Tensor:
    """A_f = sigmoid(F_uᵀ F_u) (eq. 3.11), differentiable (the affinity loss trains it).

    fused: (B, d, h, w) → (B, N, N).
    """
    tokens = fused.flatten(2)  # (B, d, N)
    return torch.sigmoid(tokens.transpose(1, 2) @ tokens)


def select_layers(aff_dec: Tensor, aff_enc: Tensor, deviation: Deviation = "abs") -> Tensor:
    """Keep the encoder affinities that deviate least from A_f (eqs. 3.12–3.13), per image.

    aff_dec: (B, N, N); aff_enc: (B, K, N, N) — the candidates. Returns keep (B, K) bool:
    S^l ≤ mean_l S^l, with S^l = Σ_ij |A_f − A^l| (`abs`, the paper) or Σ_ij (A_f − A^l)
    (`signed`, the reference code; mathematically ΣA_f − ΣA^l, so the choice ignores A_f).
    Both sum the element-wise differences (SPEC §5.1): in float32 the difference of sums rounds
    otherwise, and the layer scores lie so close that it keeps other layers than the reference.
    """
    difference = aff_dec.unsqueeze(1) - aff_enc  # (B, K, N, N)
    if deviation == "abs":
        scores = difference.abs().sum(dim=(-2, -1))
    elif deviation == "signed":
        scores = difference.sum(dim=(-2, -1))
    else:
        raise ValueError(f"unknown deviation {deviation!r}; choose abs or signed")
    return scores <= scores.mean(dim=1, keepdim=True)


def combine_affinities(aff_dec: Tensor | None, aff_enc: Tensor, keep: Tensor | None = None) -> Tensor:
    """R = A_f ⊙ mean of the kept A^l (eqs. 3.14–3.15).

    aff_dec: (B, N, N) or None (warm-up: R is the plain mean); aff_enc: (B, K, N, N);
    keep: (B, K) bool or None (= all). An image with no kept layer uses all K.
    Returns R (B, N, N).
    """
    batch, count = aff_enc.shape[:2]
    if keep is None:
        keep = torch.ones(batch, count, dtype=torch.bool, device=aff_enc.device)
    keep = keep | ~keep.any(dim=1, keepdim=True)
    weights = keep.to(aff_enc.dtype) / keep.sum(dim=1, keepdim=True)
    mean = torch.einsum("bk,bknm->bnm", weights, aff_enc)
    return mean if aff_dec is None else aff_dec * mean
