"""A student: the trained decoder on the teacher's features → class logits and decoder affinity A_f."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from affseg.decoder import SegDecoder
from affseg.refine.affinity import decoder_affinity


@dataclass
class StudentOutput:
    """logits (B, 21, H, W) decoder scores; aff_dec (B, N, N) decoder affinity A_f (with grad)."""

    logits: Tensor
    aff_dec: Tensor


class Student(nn.Module):
    """One configuration's trainable part: a `SegDecoder`."""

    def __init__(self, decoder: SegDecoder):
        super().__init__()
        self.decoder = decoder

    def forward(self, features: list[Tensor], size: tuple[int, int]) -> StudentOutput:
        """features: the teacher's decoder blocks, each (B, C_k, h, w); size: (H, W) of the input."""
        logits, fused = self.decoder(features, size)
        return StudentOutput(logits=logits, aff_dec=decoder_affinity(fused))
