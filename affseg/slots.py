"""Present-class slots: each image's present classes packed to the front (SPEC §2.2, §2.4).

The slot count S, the largest number of present classes of an image in the batch, shapes the Grad-CAM
backward and the pseudo-labels. Read from labels on the GPU it would stall the step on a host sync, so
the trainer takes it from the CPU labels before they move (`max_present`) and passes it along.
"""

from __future__ import annotations

import torch
from torch import Tensor


def max_present(labels: Tensor) -> int:
    """labels (B, K) {0, 1} → the largest present-class count of one image (0 for no image).

    Reads the value on the host: call it on CPU labels (on GPU labels it is a device sync)."""
    return int((labels > 0).sum(dim=1).max()) if labels.numel() else 0


def slot_masks(labels: Tensor, slots: int) -> Tensor:
    """(B, K) {0, 1} → (S, B, K) bool with S = `slots`: slot s marks each image's (s+1)-th present class."""
    present = labels > 0
    rank = present.long().cumsum(dim=1) - 1  # position of a present class among its image's present classes
    order = torch.arange(slots, device=labels.device).view(-1, 1, 1)
    return present.unsqueeze(0) & (rank.unsqueeze(0) == order)


def present_first(labels: Tensor, slots: int) -> tuple[Tensor, Tensor]:
    """Each image's present classes packed to the front of `slots` slots.

    labels: (B, K) {0, 1}. Returns (classes (B, S) long, in_use (B, S) bool), S = `slots` (at most K);
    slots past an image's present count are not in use (their class index is an absent class)."""
    present = labels > 0
    order = torch.argsort(present.to(torch.int8), dim=1, descending=True, stable=True)[:, :slots]
    return order, present.gather(1, order)
