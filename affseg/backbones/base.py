"""The contract every frozen vision-language encoder implements (UniCL Swin, CLIP ViT).

The rest of the project codes against :class:`DualEncoder` and :class:`ImageFeatures` only.
"""

from __future__ import annotations

import contextlib
import math
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

GRID_STRIDE = 16  # stride of the CAM / affinity / decoder grid (Swin stage 3, ViT-B/16 patches)
AUTOCAST_DEVICES = ("cpu", "cuda")  # device types whose autocast `autocast_off` leaves


@dataclass
class ImageFeatures:
    """What ``DualEncoder.encode_image`` returns.

    Attributes:
        blocks: every transformer block's output of every stage, in order, each ``(B, C_k, h_k, w_k)``
            with ``h_k = ceil(H / stride_k)``, ``w_k = ceil(W / stride_k)`` for an ``(H, W)`` input.
        block_strides: stride of each entry of ``blocks`` w.r.t. the unpadded input.
        embedding: ``(B, D)`` projected image embedding, not normalised.
    """

    blocks: list[Tensor]
    block_strides: list[int]
    embedding: Tensor


class DualEncoder(nn.Module, ABC):
    """An image tower and a text tower projected into one ``embed_dim``-dimensional space.

    Encoders come out of ``build_encoder`` frozen: every parameter has ``requires_grad=False``
    and the module is in eval mode. While all parameters are frozen, ``train(True)`` is ignored
    (a parent module's ``.train()`` cannot switch a frozen encoder into training mode).
    """

    embed_dim: int  # D, dimension of the joint image-text space
    grid_stride: int = GRID_STRIDE
    default_cam_block: int = -1  # Grad-CAM target among the grid-stride blocks: the last one
    block_strides: tuple[int, ...]  # stride of every block map, in block order
    block_channels: tuple[int, ...]  # channels C_k of every block map, in block order
    image_mean: tuple[float, float, float]  # normalisation the image tower was trained with
    image_std: tuple[float, float, float]

    @abstractmethod
    def encode_image(self, images: Tensor, grad_block: int | None = None) -> ImageFeatures:
        """Per-block maps and pooled embedding of normalised ``(B, 3, H, W)`` images, any H, W.

        With ``grad_block=k`` the blocks before ``k`` run under ``torch.no_grad()``, ``blocks[k]`` is a
        leaf tensor with ``requires_grad=True`` and the rest runs with grad enabled, so
        ``torch.autograd.grad(score, features.blocks[k])`` works while the encoder stays frozen.
        """

    @abstractmethod
    def encode_text(self, tokens: Tensor) -> Tensor:
        """``(N, 77)`` token ids -> ``(N, D)`` projected text features, not normalised."""

    @abstractmethod
    def logit_multiplier(self) -> Tensor:
        """``exp(logit_scale)``, a scalar tensor."""

    def stage_blocks(self, stride: int) -> list[int]:
        """Indices into ``ImageFeatures.blocks`` of the blocks whose maps have this stride."""
        indices = [index for index, block_stride in enumerate(self.block_strides) if block_stride == stride]
        if not indices:
            strides = sorted(set(self.block_strides))
            raise ValueError(f"no block has stride {stride}; strides of this encoder: {strides}")
        return indices

    def block_dims(self) -> list[int]:
        """Channels ``C_k`` of every entry of ``ImageFeatures.blocks``."""
        return list(self.block_channels)

    def freeze(self) -> DualEncoder:
        """Set ``requires_grad=False`` on every parameter and switch to eval mode."""
        self.requires_grad_(False)
        return self.eval()

    def train(self, mode: bool = True) -> DualEncoder:
        frozen = not any(parameter.requires_grad for parameter in self.parameters())
        return super().train(mode and not frozen)

    def _check_grad_block(self, grad_block: int | None) -> None:
        if grad_block is not None and not 0 <= grad_block < len(self.block_strides):
            count = len(self.block_strides)
            raise ValueError(f"grad_block={grad_block} is out of range: this encoder has {count} blocks")


def pad_to_multiple(images: Tensor, multiple: int) -> Tensor:
    """Zero-pad ``(B, C, H, W)`` on the bottom and right so H and W become multiples of ``multiple``."""
    height, width = images.shape[-2:]
    pad_bottom = -height % multiple
    pad_right = -width % multiple
    if pad_bottom == 0 and pad_right == 0:
        return images
    return F.pad(images, (0, pad_right, 0, pad_bottom))


def valid_size(height: int, width: int, stride: int) -> tuple[int, int]:
    """Map size ``(ceil(H / stride), ceil(W / stride))`` covering an ``(H, W)`` input."""
    return math.ceil(height / stride), math.ceil(width / stride)


def as_block_map(tokens: Tensor, valid: tuple[int, int]) -> Tensor:
    """Crop a ``(B, h_pad, w_pad, C)`` token map to ``valid`` and view it as ``(B, C, h, w)``."""
    return tokens[:, : valid[0], : valid[1]].permute(0, 3, 1, 2)


def grad_leaf(tokens: Tensor, valid: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Cut the graph at a token map and make its valid region the Grad-CAM leaf.

    Args:
        tokens: ``(B, h_pad, w_pad, C)`` block output.
        valid: ``(h, w)`` region of ``tokens`` covering the unpadded input.

    Returns:
        ``leaf``: ``(B, C, h, w)`` float32 tensor with ``requires_grad=True`` (returned as the block map), and
        ``tokens_out``: ``(B, h_pad, w_pad, C)`` equal to ``tokens`` but computed from ``leaf`` (the padding
        rows/columns are copied, detached), to feed the next block.
    """
    leaf = as_block_map(tokens, valid).detach().float().contiguous().requires_grad_(True)
    with torch.enable_grad():  # the caller may be under no_grad: the path from the leaf must be recorded
        leaf_tokens = leaf.permute(0, 2, 3, 1)
        if tuple(tokens.shape[1:3]) == tuple(valid):
            return leaf, leaf_tokens
        tokens_out = tokens.detach().to(torch.float32, copy=True)
        tokens_out[:, : valid[0], : valid[1]] = leaf_tokens
    return leaf, tokens_out


def grad_mode(grad_block: int | None, index: int) -> contextlib.AbstractContextManager:
    """Autograd mode for the step that produces block ``index`` (``index == len(blocks)``: the pooling).

    Without ``grad_block`` the caller's mode is kept; with it, the steps up to and including the leaf
    block run without grad and the later ones with grad and outside autocast, in float32 (SPEC §5.1:
    under fp16 the Grad-CAM gradients would underflow).
    """
    if grad_block is None:
        return contextlib.nullcontext()
    return torch.no_grad() if index <= grad_block else _tracked_full_precision()


@contextlib.contextmanager
def autocast_off() -> Iterator[None]:
    """Leave every active autocast region (CPU, CUDA) for the enclosed code: it runs in its inputs' dtype."""
    with contextlib.ExitStack() as stack:
        for device_type in AUTOCAST_DEVICES:
            if torch.is_autocast_enabled(device_type):
                stack.enter_context(torch.autocast(device_type, enabled=False))
        yield


@contextlib.contextmanager
def _tracked_full_precision() -> Iterator[None]:
    with torch.enable_grad(), autocast_off():
        yield
