"""Swin image tower that accepts any input size, on top of timm's ``SwinTransformer`` modules.

timm's modules hold the weights (so the state-dict layout is timm's, see ``checkpoint.py``); the
forward pass here replaces timm's fixed-resolution one:

- the input is zero-padded on the bottom/right to a multiple of 32 and every block map is cropped
  back to ``ceil(H / stride) x ceil(W / stride)``;
- window size stays 7. For each padded input shape a window layout is built once and cached:
  per stage and per dimension, a map no larger than the window gets one window spanning it and
  no shift in that dimension (timm's ``set_input_size(size, window_size=7)`` rule); otherwise
  shifted blocks shift by 3. Like timm, maps that are not a multiple of the window are padded after
  the cyclic shift and the shifted-window mask is built on the padded map, so wherever timm can run
  at a size (every stage map >= 7) the result equals timm's ``img_size=size`` model (the Swin
  detection code pads before the shift instead; UniCL's own code cannot run such sizes at all);
- where a stage map is smaller than 7 in a dimension, the relative position bias is read from the
  trained 13 x 13 table at the offsets that occur (timm would resample the table instead, which
  replaces the parameter).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from timm.models.swin_transformer import SwinTransformer, SwinTransformerBlock
from torch import Tensor

from affseg.backbones.base import as_block_map, grad_leaf, grad_mode, pad_to_multiple, valid_size

WINDOW_SIZE = 7
SHIFT_SIZE = WINDOW_SIZE // 2
PATCH_SIZE = 4
MASK_VALUE = -100.0  # attention logit added between tokens of different shifted regions (as in Swin)
BUILD_SIZE = 224  # resolution the weights are built (and the published buffers computed) for
LAYOUT_CACHE_SIZE = 16  # padded input shapes whose window layouts are kept


def relative_position_index(window: tuple[int, int], table_window: int = WINDOW_SIZE) -> Tensor:
    """``(N, N)`` rows of the ``(2 * table_window - 1) ** 2``-row bias table for a ``window`` (N = wh * ww).

    Row ``(dy + table_window - 1) * (2 * table_window - 1) + dx + table_window - 1`` holds the bias of
    the offset ``(dy, dx)``; a window smaller than ``table_window`` reads the central part of the table.
    """
    rows, cols = torch.meshgrid(torch.arange(window[0]), torch.arange(window[1]), indexing="ij")
    rows, cols = rows.flatten(), cols.flatten()
    span = 2 * table_window - 1
    delta_rows = rows[:, None] - rows[None, :] + table_window - 1
    delta_cols = cols[:, None] - cols[None, :] + table_window - 1
    return delta_rows * span + delta_cols


def _region_labels(length: int, window: int, shift: int) -> Tensor:
    """Shifted-window region id along one padded dimension: 0 = body, 1 and 2 = the rolled-in strips."""
    labels = torch.zeros(length, dtype=torch.long)
    if shift:
        labels[length - window : length - shift] = 1
        labels[length - shift :] = 2
    return labels


def shifted_window_mask(grid: tuple[int, int], window: tuple[int, int], shift: tuple[int, int]) -> Tensor | None:
    """``(num_windows, N, N)`` additive mask (0 or ``MASK_VALUE``) for a shifted map, or None if unshifted.

    Built on the window-padded map, like timm (and the original Swin at sizes divisible by the window).
    """
    if not any(shift):
        return None
    padded = [math.ceil(size / win) * win for size, win in zip(grid, window)]
    rows = _region_labels(padded[0], window[0], shift[0])
    cols = _region_labels(padded[1], window[1], shift[1])
    regions = (rows[:, None] * 3 + cols[None, :])[None, :, :, None].float()
    windows = _partition(regions, window).flatten(1)  # (num_windows, N)
    differs = windows[:, :, None] != windows[:, None, :]
    return torch.zeros(differs.shape).masked_fill(differs, MASK_VALUE)


def _partition(x: Tensor, window: tuple[int, int]) -> Tensor:
    """``(B, H, W, C)`` with H, W multiples of the window -> ``(B * num_windows, wh, ww, C)``."""
    batch, height, width, channels = x.shape
    x = x.view(batch, height // window[0], window[0], width // window[1], window[1], channels)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window[0], window[1], channels)


def _unpartition(windows: Tensor, window: tuple[int, int], height: int, width: int) -> Tensor:
    """Inverse of ``_partition``: ``(B * num_windows, wh, ww, C)`` -> ``(B, H, W, C)``."""
    channels = windows.shape[-1]
    x = windows.view(-1, height // window[0], width // window[1], window[0], window[1], channels)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, height, width, channels)


@dataclass(frozen=True)
class WindowLayout:
    """How one block partitions a ``grid`` map into windows (fixed per input shape)."""

    grid: tuple[int, int]
    window: tuple[int, int]
    shift: tuple[int, int]
    bias_index: Tensor  # (N, N) rows of the relative position bias table
    mask: Tensor | None  # (num_windows, N, N) shifted-window mask
    additive: dict = field(default_factory=dict, repr=False, compare=False)  # `attention_mask`'s cache

    @property
    def padding(self) -> tuple[int, int]:
        return -self.grid[0] % self.window[0], -self.grid[1] % self.window[1]


def window_layout(grid: tuple[int, int], shifted: bool, device: torch.device) -> WindowLayout:
    """Window, shift, bias rows and mask for a block of the given kind on a ``grid`` map."""
    window = tuple(min(size, WINDOW_SIZE) for size in grid)
    shift = tuple(SHIFT_SIZE if shifted and size > WINDOW_SIZE else 0 for size in grid)
    mask = shifted_window_mask(grid, window, shift)
    return WindowLayout(
        grid=grid,
        window=window,
        shift=shift,
        bias_index=relative_position_index(window).to(device),
        mask=None if mask is None else mask.to(device),
    )


def attention_mask(attn, layout: WindowLayout, dtype: torch.dtype) -> Tensor:
    """One block's additive attention mask on ``layout``: relative position bias (+ the shifted-window mask)
    → (heads, N, N) or (nW, heads, N, N), in ``dtype``.

    The encoder is frozen, so it is built once per block, layout and dtype and kept on the layout, for as
    long as the bias table is the same tensor at the same version (a loaded checkpoint writes it in place,
    which bumps the version); a table that takes a gradient gets a fresh mask every call."""
    table = attn.relative_position_bias_table
    tracked = table.requires_grad and torch.is_grad_enabled()
    key, stamp = (id(attn), dtype), (table.data_ptr(), table._version)
    cached = layout.additive.get(key)
    if cached is not None and not tracked and cached[0] == stamp:
        return cached[1]
    length = layout.bias_index.shape[0]
    bias = table[layout.bias_index.flatten()].view(length, length, -1).permute(2, 0, 1)
    additive = (bias if layout.mask is None else bias + layout.mask[:, None]).to(dtype)
    if not tracked:
        layout.additive[key] = (stamp, additive)
    return additive


def window_attention(block: SwinTransformerBlock, x: Tensor, layout: WindowLayout) -> Tensor:
    """(Shifted-)window self-attention of a timm Swin block on a normalised ``(B, h, w, C)`` map.

    One fused attention call (``F.scaled_dot_product_attention``) per block: the relative position bias and
    the shifted-window mask enter as one additive mask. The explicit softmax(QKᵀ·scale + bias + mask)·V it
    replaced is kept in ``tests/hot_path_reference.py`` (same output to 1e-5 in float32)."""
    batch, height, width, channels = x.shape
    if any(layout.shift):
        x = torch.roll(x, shifts=(-layout.shift[0], -layout.shift[1]), dims=(1, 2))
    pad_h, pad_w = layout.padding
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    padded_h, padded_w = height + pad_h, width + pad_w

    attn = block.attn
    tokens = _partition(x, layout.window).flatten(1, 2)  # (B * nW, N, C)
    windows, length, _ = tokens.shape
    num_windows = windows // batch
    qkv = attn.qkv(tokens).reshape(batch, num_windows, length, 3, attn.num_heads, -1).permute(3, 0, 1, 4, 2, 5)
    query, key, value = qkv.unbind(0)  # (B, nW, heads, N, head_dim)
    additive = attention_mask(attn, layout, query.dtype)  # (heads | nW × heads, N, N)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=additive, scale=attn.scale)
    out = out.transpose(2, 3).reshape(windows, length, -1)
    out = attn.proj(out)

    out = _unpartition(out.view(windows, *layout.window, channels), layout.window, padded_h, padded_w)
    out = out[:, :height, :width]
    if any(layout.shift):
        out = torch.roll(out, shifts=layout.shift, dims=(1, 2))
    return out


def run_block(block: SwinTransformerBlock, x: Tensor, layout: WindowLayout) -> Tensor:
    """One Swin block (pre-norm attention + MLP, eval mode) on a ``(B, h, w, C)`` map."""
    x = x + window_attention(block, block.norm1(x), layout)
    return x + block.mlp(block.norm2(x))


class SwinImageEncoder(SwinTransformer):
    """timm ``SwinTransformer`` (headless, built at 224) with an any-size, per-block forward.

    Stage ``i`` maps have stride ``4 * 2**i``; timm places patch merging at the start of stages 1-3.
    Use ``encode``; the inherited timm ``forward`` only runs at 224 (it serves as a reference in tests).
    """

    def __init__(self, embed_dim: int, depths: tuple[int, ...], num_heads: tuple[int, ...]):
        super().__init__(
            img_size=BUILD_SIZE,
            patch_size=PATCH_SIZE,
            num_classes=0,
            embed_dim=embed_dim,
            depths=depths,
            num_heads=num_heads,
            window_size=WINDOW_SIZE,
            drop_path_rate=0.0,
        )
        self.input_multiple = PATCH_SIZE * 2 ** (len(depths) - 1)  # every stage map then has integer size
        self.block_strides = tuple(PATCH_SIZE * 2**stage for stage, depth in enumerate(depths) for _ in range(depth))
        self.block_channels = tuple(embed_dim * 2**stage for stage, depth in enumerate(depths) for _ in range(depth))
        self._layouts: OrderedDict[tuple, list[list[WindowLayout]]] = OrderedDict()

    def layouts(self, padded_size: tuple[int, int], device: torch.device) -> list[list[WindowLayout]]:
        """Per stage, per block: the window layout for an input padded to ``padded_size`` (cached)."""
        key = (padded_size, str(device))
        if key in self._layouts:
            self._layouts.move_to_end(key)
            return self._layouts[key]
        plan = []
        for stage, layer in enumerate(self.layers):
            stride = PATCH_SIZE * 2**stage
            grid = (padded_size[0] // stride, padded_size[1] // stride)
            kinds = {shifted: window_layout(grid, shifted, device) for shifted in (False, True)}
            plan.append([kinds[index % 2 == 1] for index in range(len(layer.blocks))])
        self._layouts[key] = plan
        if len(self._layouts) > LAYOUT_CACHE_SIZE:
            self._layouts.popitem(last=False)
        return plan

    def embed_patches(self, images: Tensor) -> Tensor:
        """``(B, 3, H, W)`` with H, W multiples of 4 -> ``(B, H / 4, W / 4, C)`` normalised patch tokens."""
        tokens = self.patch_embed.proj(images).permute(0, 2, 3, 1)
        return self.patch_embed.norm(tokens)

    def encode(self, images: Tensor, grad_block: int | None = None) -> tuple[list[Tensor], Tensor]:
        """Run the tower on normalised ``(B, 3, H, W)`` images of any size.

        Returns:
            ``blocks``: every block's output ``(B, C_k, ceil(H / s_k), ceil(W / s_k))`` (views of the
            channels-last maps; ``blocks[grad_block]`` is the Grad-CAM leaf, see ``DualEncoder``), and
            ``pooled``: ``(B, C_last)`` final LayerNorm then mean over the last map's valid region (the
            tokens that only cover zero padding are left out of the mean).
        """
        height, width = images.shape[-2:]
        padded = pad_to_multiple(images, self.input_multiple)
        plan = self.layouts(tuple(padded.shape[-2:]), images.device)
        blocks: list[Tensor] = []
        index = 0
        with grad_mode(grad_block, index):
            x = self.embed_patches(padded)
        for stage, layer in enumerate(self.layers):
            valid = valid_size(height, width, PATCH_SIZE * 2**stage)
            with grad_mode(grad_block, index):
                x = layer.downsample(x)
            for block, layout in zip(layer.blocks, plan[stage]):
                with grad_mode(grad_block, index):
                    x = run_block(block, x, layout)
                if index == grad_block:
                    leaf, x = grad_leaf(x, valid)
                    blocks.append(leaf)
                else:
                    blocks.append(as_block_map(x, valid))
                index += 1
        with grad_mode(grad_block, index):
            pooled = self.norm(x[:, : valid[0], : valid[1]]).mean(dim=(1, 2))
        return blocks, pooled

