"""The frozen teacher: encoder features, Grad-CAMs of the present classes and encoder affinities (SPEC §5.2).

Everything here depends only on the data, the encoder, the CAM settings and the prompts, so one pass
serves every student trained on the same batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from affseg.backbones.base import GRID_STRIDE, valid_size
from affseg.cam import CamMethod, compute_cams
from affseg.grid import grid_validity, stage_to_grid
from affseg.prompts import ZeroShotClassifier
from affseg.refine.affinity import encoder_affinities
from affseg.slots import max_present


@dataclass
class TeacherOutput:
    """One teacher pass over B images of H×W; grid h×w = ceil(H/16) × ceil(W/16); N = h·w.

    images (B, 3, H, W) ImageNet-normalised input; labels (B, 20) multi-hot; slots: the largest
    present-class count of an image (`affseg.slots`), known on the host; features: the decoder's
    input blocks, each (B, C_k, h, w), detached; cams (B, 20, h, w) min-max CAMs (0 for absent
    classes and padding); aff_enc (B, L, N, N) float32 encoder affinities of the last L affinity
    blocks; valid (B, H, W) bool, False on crop padding, and cells (B, h, w) its grid form (both None
    when every pixel is image). `shared` holds what pseudo-labelers derive from the batch alone (PAR's
    image kernel per PAR setting), computed by the first head that needs it and reused by the others.
    """

    images: Tensor
    labels: Tensor
    slots: int
    features: list[Tensor]
    cams: Tensor
    aff_enc: Tensor
    valid: Tensor | None = None
    cells: Tensor | None = None
    shared: dict = field(default_factory=dict)

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.cams.shape[-2:])


class Teacher(nn.Module):
    """Frozen `DualEncoder` + `ZeroShotClassifier` → `TeacherOutput`.

    cam_block, decoder_blocks, affinity_blocks: indices into the encoder's `features.blocks` (decoder and
    affinity blocks may come from any stage: their maps are brought onto the stride-16 grid, SPEC §5.3);
    input_scale, input_shift (1, 3, 1, 1): map ImageNet-normalised pixels to the encoder's statistics.
    """

    def __init__(self, encoder: nn.Module, classifier: ZeroShotClassifier, cam_block: int, cam_method: CamMethod,
                 decoder_blocks: list[int], affinity_blocks: list[int], input_scale: Tensor, input_shift: Tensor):
        super().__init__()
        self.encoder = encoder.eval()
        for parameter in self.encoder.parameters():
            parameter.requires_grad_(False)
        self.classifier = classifier
        self.cam_block = cam_block
        self.cam_method = cam_method
        self.decoder_blocks = list(decoder_blocks)
        self.affinity_blocks = list(affinity_blocks)
        self.register_buffer("input_scale", input_scale, persistent=False)
        self.register_buffer("input_shift", input_shift, persistent=False)
        self._gradient_checked = False  # compute_cams' check that the CAM block's gradient is not all 0

    def train(self, mode: bool = True) -> "Teacher":
        super().train(mode)
        self.encoder.eval()  # frozen: never dropout / stochastic depth
        return self

    def encoder_input(self, images: Tensor) -> Tensor:
        """ImageNet-normalised (B, 3, H, W) → normalised with the encoder's own statistics."""
        return images * self.input_scale + self.input_shift

    def forward(self, images: Tensor, labels: Tensor, valid: Tensor | None = None,
                slots: int | None = None) -> TeacherOutput:
        """images (B, 3, H, W) normalised; labels (B, 20) multi-hot; valid (B, H, W) bool or None; slots:
        `max_present` of the labels while they were on the CPU (None = read from `labels`, a GPU sync)."""
        grid = valid_size(*images.shape[-2:], GRID_STRIDE)
        cells = None if valid is None else grid_validity(valid, grid)
        slots = max_present(labels) if slots is None else slots
        cams, features = compute_cams(self.encoder, self.classifier, self.encoder_input(images), labels,
                                      self.cam_block, self.cam_method, cells=cells, slots=slots,
                                      check_gradient=not self._gradient_checked)
        self._gradient_checked = True
        with torch.no_grad(), torch.autocast(images.device.type, enabled=False):  # affinities in float32
            aff_enc = encoder_affinities([block.float() for block in self._on_grid(features, self.affinity_blocks, grid)])
        return TeacherOutput(images=images, labels=labels, slots=slots,
                             features=self._on_grid(features, self.decoder_blocks, grid), cams=cams,
                             aff_enc=aff_enc, valid=valid, cells=cells)

    @torch.no_grad()
    def features(self, images: Tensor) -> list[Tensor]:
        """The decoder's input blocks only (no CAMs): images (B, 3, H, W) → [(B, C_k, h, w)]."""
        features = self.encoder.encode_image(self.encoder_input(images))
        return self._on_grid(features, self.decoder_blocks, valid_size(*images.shape[-2:], GRID_STRIDE))

    @staticmethod
    def _on_grid(features, indices: list[int], grid: tuple[int, int]) -> list[Tensor]:
        return [stage_to_grid(features.blocks[i], features.block_strides[i], grid) for i in indices]
