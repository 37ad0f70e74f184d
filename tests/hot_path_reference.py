"""The hot-path implementations that issue 13 replaced, kept as the equality references of the tests and as
the "old" side of `benchmarks/hot_path.py` (one copy, imported by both).

- `reference_cams`: Grad-CAM with one `autograd.grad` per present-class slot (now one batched backward);
- `reference_par`: PAR as 48 shifted `addcmul_` per iteration on replicate-padded maps and a
  neighbour-by-neighbour kernel (now one gather for the kernel and one `embedding_bag` per iteration);
- `reference_window_attention`: Swin window attention as explicit softmax(QKᵀ·scale + bias + mask)·V;
- `reference_encoder_affinities`: one matmul per block;
- `reference_component_labels`: the box masks' components propagated until `torch.equal` says stable.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from affseg.backbones.swin import WindowLayout, _partition, _unpartition
from affseg.cam import cam_from_gradients, minmax_normalise
from affseg.refine.par import STD_EPS, neighbour_offsets
from affseg.slots import max_present, slot_masks


def reference_cams(teacher, images: Tensor, labels: Tensor, method: str) -> Tensor:
    """The per-slot loop: one `autograd.grad` of the summed slot probabilities per present-class slot."""
    present = labels > 0
    num_fg = labels.shape[1]
    with torch.enable_grad():
        features = teacher.encoder.encode_image(teacher.encoder_input(images), grad_block=teacher.cam_block)
        acts = features.blocks[teacher.cam_block]
        logits = teacher.classifier.logits(features.embedding.float())
        absent = ~present & present.any(dim=1, keepdim=True)
        fg_logits = logits[:, :num_fg].masked_fill(absent, float("-inf"))
        probs = torch.cat([fg_logits, logits[:, num_fg:]], dim=1).softmax(dim=1)[:, :num_fg]
        slots = slot_masks(labels, max_present(labels))
        cams = acts.new_zeros(acts.shape[0], num_fg, *acts.shape[-2:], dtype=torch.float32)
        for index, mask in enumerate(slots):
            (grads,) = torch.autograd.grad((probs * mask).sum(), acts, retain_graph=index < len(slots) - 1)
            cams = cams + mask[:, :, None, None] * cam_from_gradients(acts.detach().float(), grads.float(), method)[:, None]
    return minmax_normalise(cams)


def _shifted(padded: Tensor, offset: tuple[int, int], pad: int, size: tuple[int, int]) -> Tensor:
    """The view of a replicate-padded (…, H + 2·pad, W + 2·pad) tensor seen from `offset`."""
    dy, dx = offset
    height, width = size
    return padded[..., pad + dy : pad + dy + height, pad + dx : pad + dx + width]


def reference_par_kernel(images: Tensor, dilations: list[int], w1: float, w2: float) -> Tensor:
    """κ neighbour by neighbour on replicate-padded images. images: (B, 3, H, W) → (B, P, H, W)."""
    offsets = neighbour_offsets(dilations)
    pad = max(dilations)
    size = images.shape[-2:]
    padded = F.pad(images, (pad, pad, pad, pad), mode="replicate")
    neighbours = [_shifted(padded, offset, pad, size) for offset in offsets]

    mean = sum(neighbours) / len(neighbours)
    var = sum((n - mean).pow(2) for n in neighbours) / (len(neighbours) - 1)
    scale = (var.sqrt() + STD_EPS) * w1  # (B, 3, H, W)
    colour = torch.stack([-((images - n).abs() / scale).pow(2).mean(dim=1) for n in neighbours], dim=1)

    lengths = torch.tensor([math.hypot(dy, dx) for dy, dx in offsets], dtype=images.dtype, device=images.device)
    position = -(lengths / ((lengths.std() + STD_EPS) * w1)).pow(2)
    return colour.softmax(dim=1) + w2 * position.softmax(dim=0).view(1, -1, 1, 1)


def reference_propagate(kernel: Tensor, maps: Tensor, dilations: list[int], iterations: int) -> Tensor:
    """`iterations` of M ← Σ_p κ_p M_p as one `addcmul_` per neighbour. kernel: (B, P, H, W); maps: (B, K, H, W)."""
    offsets = neighbour_offsets(dilations)
    pad = max(dilations)
    size = maps.shape[-2:]
    for _ in range(iterations):
        padded = F.pad(maps, (pad, pad, pad, pad), mode="replicate")
        out = torch.zeros_like(maps)
        for index, offset in enumerate(offsets):
            out.addcmul_(kernel[:, index : index + 1], _shifted(padded, offset, pad, size))
        maps = out
    return maps


@torch.no_grad()
def reference_par(images: Tensor, maps: Tensor, dilations: list[int], iterations: int, w1: float,
                  w2: float) -> Tensor:
    """PAR at full resolution, the kernel included (the old `affseg.refine.par.par` at scale 1)."""
    return reference_propagate(reference_par_kernel(images, dilations, w1, w2), maps, dilations, iterations)


def reference_window_attention(block, x: Tensor, layout: WindowLayout) -> Tensor:
    """Swin window attention with the logits written out (the old `affseg.backbones.swin.window_attention`)."""
    batch, height, width, channels = x.shape
    if any(layout.shift):
        x = torch.roll(x, shifts=(-layout.shift[0], -layout.shift[1]), dims=(1, 2))
    pad_h, pad_w = layout.padding
    x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    attn = block.attn
    tokens = _partition(x, layout.window).flatten(1, 2)
    windows, length, _ = tokens.shape
    qkv = attn.qkv(tokens).reshape(windows, length, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    query, key, value = qkv.unbind(0)
    logits = (query * attn.scale) @ key.transpose(-2, -1)
    bias = attn.relative_position_bias_table[layout.bias_index.flatten()]
    logits = logits + bias.view(length, length, -1).permute(2, 0, 1)
    if layout.mask is not None:
        num_windows = layout.mask.shape[0]
        logits = logits.view(batch, num_windows, attn.num_heads, length, length)
        logits = logits + layout.mask[None, :, None].to(logits.dtype)
        logits = logits.view(windows, attn.num_heads, length, length)
    out = (logits.softmax(dim=-1) @ value).transpose(1, 2).reshape(windows, length, -1)
    out = attn.proj(out)
    out = _unpartition(out.view(windows, *layout.window, channels), layout.window, height + pad_h, width + pad_w)
    out = out[:, :height, :width]
    if any(layout.shift):
        out = torch.roll(out, shifts=layout.shift, dims=(1, 2))
    return out


def reference_encoder_affinities(blocks: list[Tensor]) -> Tensor:
    """Cosine affinities, one matmul per block. blocks: K × (B, C_k, h, w) → (B, K, N, N)."""
    affinities = []
    for block in blocks:
        tokens = F.normalize(block.flatten(2), dim=1)
        affinities.append(tokens.transpose(1, 2) @ tokens)
    return torch.stack(affinities, dim=1).clamp(min=0)


def reference_component_labels(mask: Tensor) -> Tensor:
    """8-connected components of (M, h, w) bool masks: 3×3 max propagation until nothing changes (one
    host sync per round; the old `affseg.refine.random_walk._component_labels`). 0 outside the mask,
    1 + the component's largest flat index inside."""
    height, width = mask.shape[-2:]
    ids = torch.arange(1, height * width + 1, device=mask.device, dtype=torch.float64)
    keep = mask.unsqueeze(1).to(torch.float64)
    labels = ids.view(1, 1, height, width) * keep
    while True:
        grown = F.max_pool2d(labels, kernel_size=3, stride=1, padding=1) * keep
        if torch.equal(grown, labels):
            return labels.squeeze(1).long()
        labels = grown


def snake_mask(height: int, width: int) -> Tensor:
    """(h, w) bool: one serpentine path through every other row, the longest 8-connected path a grid
    holds, the worst case of max propagation."""
    mask = torch.zeros(height, width, dtype=torch.bool)
    mask[::2] = True
    for row in range(1, height, 2):
        mask[row, width - 1 if (row // 2) % 2 == 0 else 0] = True
    return mask
