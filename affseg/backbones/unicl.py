"""UniCL dual encoder: Swin image tower + CLIP-like causal text transformer, one joint space.

Architecture of microsoft/UniCL (see ``/work/shared/reference/UNICL_FACTS.md``):
image ``x -> Swin -> LayerNorm -> mean over tokens -> @ image_projection (C, D)``;
text ``ids -> 12 pre-LN blocks (QuickGELU, causal, LayerNorm eps 1e-12) -> ln_final -> token at
argmax(ids) (the first end-of-text) -> @ text_projection (W, D)``; similarity ``exp(logit_scale) * cos``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from open_clip.transformer import LayerNormFp32, QuickGELU, TextTransformer
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import trunc_normal_
from torch import Tensor, nn

from affseg.backbones.base import DualEncoder, ImageFeatures, grad_mode
from affseg.backbones.swin import SwinImageEncoder
from affseg.backbones.tokenizer import CONTEXT_LENGTH, VOCAB_SIZE

TEXT_LAYER_NORM_EPS = 1e-12  # UniCL's "TF-style" LayerNorm
TEXT_MLP_RATIO = 4.0
LOGIT_SCALE_INIT = 1.0  # UniCL initialises logit_scale to 1 (multiplier e)
PROJECTION_INIT_STD = 0.02


@dataclass(frozen=True)
class UniCLConfig:
    """Shape of a UniCL encoder; the Swin window (7) and patch (4) are fixed."""

    name: str
    embed_dim: int  # D: joint space
    swin_embed_dim: int
    swin_depths: tuple[int, ...]
    swin_heads: tuple[int, ...]
    text_width: int
    text_layers: int
    text_heads: int


UNICL_SWIN_B = UniCLConfig(
    name="unicl_swin_b",
    embed_dim=512,
    swin_embed_dim=128,
    swin_depths=(2, 2, 18, 2),
    swin_heads=(4, 8, 16, 32),
    text_width=512,
    text_layers=12,
    text_heads=8,
)

# Demo/test encoder, same code. The 49,408 x width token embedding dominates the text tower, so the
# text width is 44 (4 heads of 11) to keep the whole encoder under 6M parameters (5.79M).
UNICL_SWIN_TINY = UniCLConfig(
    name="unicl_swin_tiny",
    embed_dim=128,
    swin_embed_dim=32,
    swin_depths=(2, 2, 8, 2),
    swin_heads=(1, 2, 4, 8),
    text_width=44,
    text_layers=4,
    text_heads=4,
)

UNICL_CONFIGS = {config.name: config for config in (UNICL_SWIN_B, UNICL_SWIN_TINY)}


def build_text_tower(config: UniCLConfig) -> TextTransformer:
    """open_clip ``TextTransformer`` configured as UniCL's text encoder (projection included)."""
    return TextTransformer(
        context_length=CONTEXT_LENGTH,
        vocab_size=VOCAB_SIZE,
        width=config.text_width,
        heads=config.text_heads,
        layers=config.text_layers,
        mlp_ratio=TEXT_MLP_RATIO,
        output_dim=config.embed_dim,
        pool_type="argmax",
        proj_type="linear",
        proj_bias=False,
        act_layer=QuickGELU,
        norm_layer=partial(LayerNormFp32, eps=TEXT_LAYER_NORM_EPS),
    )


class UniCLEncoder(DualEncoder):
    """UniCL image/text encoder (random init; weights come from ``checkpoint.load_unicl``).

    Modules: ``image_encoder`` (timm Swin layout), ``text_encoder`` (open_clip ``TextTransformer``
    layout, its ``text_projection`` is UniCL's top-level one), ``image_projection`` ``(C, D)``,
    ``logit_scale`` (scalar).
    """

    image_mean = IMAGENET_DEFAULT_MEAN
    image_std = IMAGENET_DEFAULT_STD

    def __init__(self, config: UniCLConfig):
        super().__init__()
        self.config = config
        self.embed_dim = config.embed_dim
        self.image_encoder = SwinImageEncoder(config.swin_embed_dim, config.swin_depths, config.swin_heads)
        self.text_encoder = build_text_tower(config)
        self.image_projection = nn.Parameter(torch.empty(self.image_encoder.num_features, config.embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(LOGIT_SCALE_INIT))
        trunc_normal_(self.image_projection, std=PROJECTION_INIT_STD)
        self.block_strides = self.image_encoder.block_strides
        self.block_channels = self.image_encoder.block_channels

    def encode_image(self, images: Tensor, grad_block: int | None = None) -> ImageFeatures:
        """``(B, 3, H, W)`` ImageNet-normalised images, any H, W -> per-block maps + ``(B, D)`` embedding.

        Blocks: 4 stages at strides 4, 8, 16, 32. The embedding pools the last stage over its valid
        region (tokens that only see zero padding are excluded), then projects.
        """
        self._check_grad_block(grad_block)
        blocks, pooled = self.image_encoder.encode(images, grad_block)
        with grad_mode(grad_block, len(blocks)):
            embedding = pooled @ self.image_projection
        return ImageFeatures(blocks=blocks, block_strides=list(self.block_strides), embedding=embedding)

    def encode_text(self, tokens: Tensor) -> Tensor:
        """``(N, 77)`` token ids -> ``(N, D)``, not normalised."""
        if tokens.ndim != 2 or tokens.shape[1] != CONTEXT_LENGTH:
            raise ValueError(f"expected token ids of shape (N, {CONTEXT_LENGTH}), got {tuple(tokens.shape)}")
        return self.text_encoder(tokens)

    def logit_multiplier(self) -> Tensor:
        return self.logit_scale.exp()
