"""Segmentation decoder on frozen encoder blocks (SPEC §2.3, eqs. 3.6–3.7).

blocks → per-block MLP (eq. 3.6) → concat → 1×1 conv + dropout = F_u (eq. 2)
→ pre-norm transformer layers over the h·w tokens → 1×1 conv → bilinear upsampling.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from affseg.data.classes import NUM_CLASSES
from affseg.grid import grid_to_pixels


def dropout_noise(like: Tensor, p: float) -> Tensor:
    """The scaled keep-mask that CPU `F.dropout` multiplies by: Bernoulli(1 − p) / (1 − p), shaped and typed as
    `like`. Drawn explicitly on every device, so that a group's batched decoders (`affseg.engine.batched`) can
    draw each member's mask outside `vmap`, from that member's RNG, exactly as the member alone does."""
    return torch.empty_like(like).bernoulli_(1 - p).div_(1 - p)


class BlockMLP(nn.Module):
    """F_new = W1 ReLU(W2 F) on every token (eq. 3.6), as 1×1 convolutions. (B, C, h, w) → (B, D, h, w)."""

    def __init__(self, in_dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(in_dim, hidden_dim, kernel_size=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden_dim, hidden_dim, kernel_size=1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class SegDecoder(nn.Module):
    """Fuse encoder blocks into F_u and predict class logits.

    in_dims: channels of each block fed in (same order as `forward`'s blocks); dim: d of F_u and the
    transformer; mlp_dim: width of each block MLP; depth, heads, mlp_ratio: the transformer layers;
    dropout: on F_u. The transformer stack is followed by a final LayerNorm (usual for pre-norm stacks).
    """

    def __init__(self, in_dims: list[int], dim: int, mlp_dim: int, depth: int, heads: int, mlp_ratio: float,
                 dropout: float, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        if not in_dims:
            raise ValueError("SegDecoder needs at least one input block")
        self.mlps = nn.ModuleList(BlockMLP(in_dim, mlp_dim) for in_dim in in_dims)
        self.fuse = nn.Conv2d(len(in_dims) * mlp_dim, dim, kernel_size=1)
        self.dropout = dropout
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(
                d_model=dim,
                nhead=heads,
                dim_feedforward=round(dim * mlp_ratio),
                dropout=0.0,
                activation="gelu",
                batch_first=True,
                norm_first=True,
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Conv2d(dim, num_classes, kernel_size=1)

    def forward(self, blocks: list[Tensor], out_size: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """blocks: (B, C_k, h, w) each, all on the stride-16 grid (the teacher brings other stages there,
        `affseg.grid.stage_to_grid`). out_size: (H, W) of the image the grid was computed from.

        Returns (logits (B, num_classes, *out_size), fused F_u (B, d, h, w)).
        """
        fused = self.fuse_blocks(blocks)
        if self.training and self.dropout > 0:
            fused = fused * dropout_noise(fused, self.dropout)
        return self.predict(fused, out_size), fused

    def fuse_blocks(self, blocks: list[Tensor]) -> Tensor:
        """F_u before dropout: (B, d, h, w) from the blocks of `forward`."""
        if len(blocks) != len(self.mlps):
            raise ValueError(f"SegDecoder built for {len(self.mlps)} blocks, got {len(blocks)}")
        grid = blocks[0].shape[-2:]
        if any(block.shape[-2:] != grid for block in blocks):
            raise ValueError(f"SegDecoder blocks must share one grid, got {[tuple(b.shape[-2:]) for b in blocks]}")
        projected = [mlp(block) for mlp, block in zip(self.mlps, blocks)]
        return self.fuse(torch.cat(projected, dim=1))

    def predict(self, fused: Tensor, out_size: tuple[int, int]) -> Tensor:
        """Class logits (B, num_classes, *out_size) from F_u (B, d, h, w)."""
        batch, dim, height, width = fused.shape
        tokens = fused.flatten(2).transpose(1, 2)  # (B, h·w, d)
        for layer in self.layers:
            tokens = layer(tokens)
        tokens = self.norm(tokens).transpose(1, 2).reshape(batch, dim, height, width)
        return grid_to_pixels(self.head(tokens), out_size)  # SPEC §5.1: padded extent, then crop
