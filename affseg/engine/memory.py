"""Memory guard for fused groups: estimate what each head adds and refuse, in one line, a K that does not fit.

A head holds its student's weights, gradients, AdamW moments and the rollback snapshot (weights + moments):
6 copies of the parameters, 2 more when the group's decoders run batched (the stacked weights and their
gradient, `train.batch_heads`). Its step adds the decoder's activations (kept for backward) and the refinement's
working set on top of the shared teacher. The estimate counts, in float32 per micro-batch of B images of
S×S crops, grid N = (S/16)²:
- decoder: each transformer layer keeps ~`LAYER_ACTIVATIONS` tensors of (B, N, d); A_f (B, N, N) three times
  (product, sigmoid, gradient); logits (B, 21, S, S) three times (logits, softmax, gradient);
- refinement: the affinity stack and Sinkhorn (B, N, N) `REFINE_MAPS` times; PAR's maps (B, 1 + C, S, S) for
  `PAR_COPIES` copies with C = `PRESENT_CLASSES` (PAR's image kernel is shared by the heads).
It is an estimate, sized to err on the large side; the device's free memory after the teacher is built
is the budget.
"""

from __future__ import annotations

import os

import torch

from affseg.config import Config
from affseg.data.classes import NUM_CLASSES

FLOAT_BYTES = 4
PARAMETER_COPIES = 6  # weights, gradients, two AdamW moments, snapshot of weights and of the moments (approx.)
LAYER_ACTIVATIONS = 12  # (B, N, d) tensors a pre-norm transformer layer with a 4× MLP keeps for backward
AFFINITY_COPIES = 3  # A_f: product, sigmoid, gradient
LOGIT_COPIES = 3  # logits, softmax, gradient
REFINE_MAPS = 4  # (B, N, N): combined affinity, Sinkhorn iterates, transition
PAR_COPIES = 3  # PAR: maps, their pixel-major table, the next iteration's table
STACKED_COPIES = 2  # batched heads: the per-call stack of the weights and its gradient
PRESENT_CLASSES = 3  # present classes per image budgeted for (VOC images rarely have more)
GRID_STRIDE = 16


def head_bytes(config: Config, parameters: int, batched: bool = False) -> int:
    """Estimated bytes one head adds to a fused group (see the module docstring); `batched`: its decoder
    runs stacked with the others'."""
    batch, size = config.train.batch_size, config.data.crop_size
    cells = (size // GRID_STRIDE) ** 2
    pixels = size * size
    dim, layers = config.model.decoder_dim, config.model.decoder_layers
    floats = (PARAMETER_COPIES + (STACKED_COPIES if batched else 0)) * parameters
    floats += batch * (LAYER_ACTIVATIONS * layers * cells * dim + AFFINITY_COPIES * cells * cells
                       + LOGIT_COPIES * NUM_CLASSES * pixels)
    floats += batch * (REFINE_MAPS * cells * cells + PAR_COPIES * (1 + PRESENT_CLASSES) * pixels)
    return floats * FLOAT_BYTES


def free_bytes(device: torch.device) -> int:
    """Free memory of `device`: CUDA's free bytes, or the host's available physical memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def largest_fitting(per_head: int, available: int) -> int:
    return max(0, available // per_head) if per_head else 0


def fit_message(heads: int, per_head: int, available: int, device: torch.device) -> str | None:
    """None when `heads` heads fit `available` bytes; else the one line to print, with the largest K that fits."""
    if heads * per_head <= available:
        return None
    gib = 2**30
    return (f"fuse={heads}: {heads} heads need about {heads * per_head / gib:.1f} GiB, {available / gib:.1f} GiB is "
            f"free on {device}; the largest fuse that fits is {largest_fitting(per_head, available)}")
