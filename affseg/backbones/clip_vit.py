"""CLIP ViT dual encoder (the WeCLIP baseline) on open_clip's ``CLIP`` model, any input size.

OpenAI's architecture with QuickGELU. Per-block maps are the patch tokens of every residual block
(class token dropped), all at the patch stride. Inputs are zero-padded on the bottom/right to a
multiple of the patch size and the maps cropped back; the learned position embeddings are resampled
bicubically to the patch grid of the padded input. The class token attends to all tokens, padding
included, so the pooled embedding of a padded input also sees the padding.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
from torch import Tensor

from affseg.backbones.base import (
    DualEncoder,
    ImageFeatures,
    as_block_map,
    grad_leaf,
    grad_mode,
    pad_to_multiple,
    valid_size,
)
from affseg.backbones.tokenizer import CONTEXT_LENGTH, VOCAB_SIZE

HEAD_WIDTH = 64  # OpenAI CLIP: heads = width // 64 in both towers (open_clip infers it so from a file)


@dataclass(frozen=True)
class ClipConfig:
    """Shape of an OpenAI-style CLIP ViT."""

    name: str
    embed_dim: int  # D: joint space
    vision_width: int
    vision_layers: int
    patch_size: int
    image_size: int  # resolution of the learned position embeddings
    text_width: int
    text_layers: int


CLIP_VIT_B16 = ClipConfig(
    name="clip_vit_b16",
    embed_dim=512,
    vision_width=768,
    vision_layers=12,
    patch_size=16,
    image_size=224,
    text_width=512,
    text_layers=12,
)

# Test encoder, same code: 12 blocks at stride 16 like ViT-B/16, one 64-wide head per layer.
CLIP_VIT_TINY = ClipConfig(
    name="clip_vit_tiny",
    embed_dim=64,
    vision_width=64,
    vision_layers=12,
    patch_size=16,
    image_size=224,
    text_width=64,
    text_layers=2,
)

CLIP_CONFIGS = {config.name: config for config in (CLIP_VIT_B16, CLIP_VIT_TINY)}


def build_clip(config: ClipConfig) -> CLIP:
    """Randomly initialised open_clip ``CLIP`` with QuickGELU, shaped like ``config``."""
    vision = CLIPVisionCfg(
        layers=config.vision_layers,
        width=config.vision_width,
        head_width=HEAD_WIDTH,
        patch_size=config.patch_size,
        image_size=config.image_size,
    )
    text = CLIPTextCfg(
        context_length=CONTEXT_LENGTH,
        vocab_size=VOCAB_SIZE,
        width=config.text_width,
        heads=config.text_width // HEAD_WIDTH,
        layers=config.text_layers,
    )
    return CLIP(config.embed_dim, vision_cfg=vision, text_cfg=text, quick_gelu=True)


def resample_position_embedding(embedding: Tensor, grid: tuple[int, int], new_grid: tuple[int, int]) -> Tensor:
    """Bicubically resample ``(1 + g0 * g1, C)`` ViT position embeddings to ``new_grid``; class slot kept."""
    if tuple(grid) == tuple(new_grid):
        return embedding
    class_slot, patches = embedding[:1], embedding[1:]
    patches = patches.reshape(1, grid[0], grid[1], -1).permute(0, 3, 1, 2).float()
    patches = F.interpolate(patches, size=new_grid, mode="bicubic", align_corners=False)
    patches = patches.permute(0, 2, 3, 1).reshape(new_grid[0] * new_grid[1], -1).to(embedding.dtype)
    return torch.cat([class_slot, patches])


def vit_block_maps(
    x: Tensor,
    layers: Iterable[Callable[[Tensor], Tensor]],
    grid: tuple[int, int],
    valid: tuple[int, int],
    grad_block: int | None,
) -> tuple[list[Tensor], Tensor]:
    """Run ViT layers on ``(B, 1 + gh * gw, C)`` tokens (class token first), keeping each layer's patch tokens.

    Returns every layer's map ``(B, C, h, w)`` cropped to ``valid`` and the last layer's tokens. With
    ``grad_block=k``, layer ``k``'s map is the Grad-CAM leaf and the class token leaving it is detached.
    """
    batch = x.shape[0]
    blocks: list[Tensor] = []
    for index, layer in enumerate(layers):
        with grad_mode(grad_block, index):
            x = layer(x)
        token_map = x[:, 1:].reshape(batch, *grid, -1)
        if index == grad_block:
            leaf, token_map = grad_leaf(token_map, valid)
            with torch.enable_grad():
                x = torch.cat([x[:, :1].detach(), token_map.flatten(1, 2)], dim=1)
            blocks.append(leaf)
        else:
            blocks.append(as_block_map(token_map, valid))
    return blocks, x


class ClipVitEncoder(DualEncoder):
    """open_clip ``CLIP`` (ViT image tower) behind the ``DualEncoder`` interface, held as ``self.model``."""

    image_mean = OPENAI_DATASET_MEAN
    image_std = OPENAI_DATASET_STD
    # SPEC §5.1: the output of the second-to-last block (WeCLIP, CLIP-ES); after the last block only the
    # class token reaches the embedding, so every patch-token gradient there is exactly 0
    default_cam_block = -2

    def __init__(self, config: ClipConfig, model: CLIP | None = None):
        super().__init__()
        self.config = config
        self.model = build_clip(config) if model is None else model
        if not self.model.visual.transformer.batch_first:
            raise ValueError("the CLIP vision transformer must be batch-first")
        self.embed_dim = config.embed_dim
        self.patch_size = config.patch_size
        self.block_strides = (config.patch_size,) * config.vision_layers
        self.block_channels = (config.vision_width,) * config.vision_layers

    def encode_image(self, images: Tensor, grad_block: int | None = None) -> ImageFeatures:
        """``(B, 3, H, W)`` CLIP-normalised images, any H, W -> 12 maps at stride 16 + ``(B, D)`` embedding.

        The embedding is CLIP's own image feature: ``ln_post`` of the class token ``@ proj``. With
        ``grad_block=k`` the class token leaving block ``k`` is detached, so the embedding depends on
        ``blocks[k]`` only through the attention of later blocks: ``k`` must not be the last block.
        """
        self._check_grad_block(grad_block)
        visual = self.model.visual
        batch = images.shape[0]
        valid = valid_size(*images.shape[-2:], self.patch_size)
        with grad_mode(grad_block, 0):
            patches = visual.conv1(pad_to_multiple(images, self.patch_size))  # (B, C, gh, gw)
            grid = tuple(patches.shape[-2:])
            tokens = patches.flatten(2).transpose(1, 2)
            class_token = visual.class_embedding.to(tokens.dtype).expand(batch, 1, -1)
            position = resample_position_embedding(visual.positional_embedding, visual.grid_size, grid)
            x = visual.ln_pre(torch.cat([class_token, tokens], dim=1) + position.to(tokens.dtype))

        blocks, x = vit_block_maps(x, visual.transformer.resblocks, grid, valid, grad_block)
        with grad_mode(grad_block, len(blocks)):
            embedding = visual.ln_post(x[:, 0]) @ visual.proj
        return ImageFeatures(blocks=blocks, block_strides=list(self.block_strides), embedding=embedding)

    def encode_text(self, tokens: Tensor) -> Tensor:
        """``(N, 77)`` token ids -> ``(N, D)``, not normalised."""
        if tokens.ndim != 2 or tokens.shape[1] != CONTEXT_LENGTH:
            raise ValueError(f"expected token ids of shape (N, {CONTEXT_LENGTH}), got {tuple(tokens.shape)}")
        return self.model.encode_text(tokens)

    def logit_multiplier(self) -> Tensor:
        return self.model.logit_scale.exp()
