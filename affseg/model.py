"""UniCL-AffSeg: frozen dual encoder → Grad-CAM → affinity refinement → pseudo-labels; trained decoder.

Only the decoder trains. The encoder is frozen (no parameter requires grad, always in eval mode)
while autograd still flows from the text-classifier score back to the Grad-CAM target block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from affseg.backbones.base import GRID_STRIDE, valid_size
from affseg.backbones.demo_weights import default_checkpoint
from affseg.backbones.registry import build_encoder
from affseg.cam import compute_cams
from affseg.config import Config, ModelConfig
from affseg.data.classes import VOC_CLASSES
from affseg.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from affseg.decoder import SegDecoder
from affseg.grid import grid_validity
from affseg.losses import affinity_loss, segmentation_loss, total_loss
from affseg.prompts import BACKGROUND_WORDS, ZeroShotClassifier
from affseg.refine.affinity import decoder_affinity, encoder_affinities
from affseg.refine.pseudo import pseudo_labels, refine_cams

FOREGROUND_NAMES = list(VOC_CLASSES[1:])


@dataclass
class ModelOutput:
    """One training forward. B images of H×W; grid h×w = H/16 × W/16; N = h·w.

    logits (B, 21, H, W) decoder scores; aff_dec (B, N, N) decoder affinity (with grad);
    cams (B, 20, h, w) raw min-max CAMs (0 for absent classes); refined (B, 20, h, w) random-walk
    maps; pseudo (B, H, W) int64 pseudo-labels in VOC indices (255 = ignore band).
    """

    logits: Tensor
    aff_dec: Tensor
    cams: Tensor
    refined: Tensor
    pseudo: Tensor


def renormalisation(mean: tuple[float, ...], std: tuple[float, ...]) -> tuple[Tensor, Tensor]:
    """(scale, shift), each (1, 3, 1, 1), mapping ImageNet-normalised pixels to (x − mean) / std."""
    in_mean, in_std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    out_mean, out_std = torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)
    scale = in_std / out_std
    shift = (in_mean - out_mean) / out_std
    return scale.view(1, 3, 1, 1), shift.view(1, 3, 1, 1)


def select_blocks(grid_blocks: list[int], chosen: list[int], key: str) -> list[int]:
    """Map indices among the stride-16 blocks (negative allowed) to encoder block indices; [] = all."""
    if not chosen:
        return list(grid_blocks)
    try:
        return [grid_blocks[i] for i in chosen]
    except IndexError:
        raise ValueError(f"model.{key}: {chosen} out of range for {len(grid_blocks)} stride-16 blocks") from None


class UniClAffSeg(nn.Module):
    """The whole method around a frozen `DualEncoder` (see affseg.backbones)."""

    def __init__(self, encoder: nn.Module, config: Config):
        super().__init__()
        self.config = config
        self.encoder = encoder.eval()
        for parameter in self.encoder.parameters():
            parameter.requires_grad_(False)
        model_cfg: ModelConfig = config.model
        grid_blocks = encoder.stage_blocks(encoder.grid_stride)
        cam_block = encoder.default_cam_block if model_cfg.cam_block is None else model_cfg.cam_block
        self.cam_block = select_blocks(grid_blocks, [cam_block], "cam_block")[0]
        self.decoder_blocks = select_blocks(grid_blocks, model_cfg.decoder_blocks, "decoder_blocks")
        self.affinity_blocks = select_blocks(grid_blocks, model_cfg.affinity_blocks, "affinity_blocks")
        self.classifier = ZeroShotClassifier(
            encoder,
            FOREGROUND_NAMES,
            list(BACKGROUND_WORDS) if model_cfg.background_prompts else [],
            [model_cfg.prompt_template],
        )
        # Data arrive ImageNet-normalised; an encoder trained with other statistics (CLIP) gets its own.
        scale, shift = renormalisation(encoder.image_mean, encoder.image_std)
        self.register_buffer("input_scale", scale, persistent=False)
        self.register_buffer("input_shift", shift, persistent=False)
        dims = encoder.block_dims()
        self.decoder = SegDecoder([dims[i] for i in self.decoder_blocks], model_cfg)

    def train(self, mode: bool = True) -> "UniClAffSeg":
        super().train(mode)
        self.encoder.eval()  # frozen: never dropout / stochastic depth
        return self

    def encoder_input(self, images: Tensor) -> Tensor:
        """ImageNet-normalised (B, 3, H, W) → normalised with the encoder's own statistics."""
        return images * self.input_scale + self.input_shift

    def refinement_active(self, iteration: int) -> bool:
        """Whether A_f joins the refinement at this iteration (SPEC §2.4 step 7)."""
        return iteration >= self.config.refine.refine_start * self.config.train.iterations

    def forward(self, images: Tensor, labels: Tensor, iteration: int, valid: Tensor | None = None) -> ModelOutput:
        """images (B, 3, H, W) normalised; labels (B, 20) multi-hot; iteration = optimiser steps done;
        valid (B, H, W) bool, False on crop padding (None = all image; SPEC §5.1: padding is ignored)."""
        cells = None if valid is None else grid_validity(valid, valid_size(*images.shape[-2:], GRID_STRIDE))
        cams, features = compute_cams(
            self.encoder, self.classifier, self.encoder_input(images), labels, self.cam_block,
            self.config.model.cam_method, cells=cells,
        )
        logits, fused = self.decoder([features.blocks[i] for i in self.decoder_blocks], images.shape[-2:])
        aff_dec = decoder_affinity(fused)
        with torch.no_grad():
            refined, pseudo = self.pseudo_labels(images, labels, cams, features, aff_dec, iteration, valid)
        return ModelOutput(logits=logits, aff_dec=aff_dec, cams=cams, refined=refined, pseudo=pseudo)

    @torch.no_grad()
    def pseudo_labels(self, images, labels, cams, features, aff_dec, iteration, valid=None) -> tuple[Tensor, Tensor]:
        """Refined maps (B, 20, h, w) and pseudo-labels (B, H, W) from CAMs and affinities.

        Always float32: autocast is switched off here, since under it the affinity products and the
        random walk would run in bf16/fp16 whatever the dtype of their inputs.
        """
        cells = None if valid is None else grid_validity(valid, cams.shape[-2:])
        with torch.autocast(images.device.type, enabled=False):
            aff_enc = encoder_affinities([features.blocks[i].float() for i in self.affinity_blocks])
            decoder_aff = aff_dec.detach().float() if self.refinement_active(iteration) else None
            refined = refine_cams(cams.float(), aff_enc, decoder_aff, self.config.refine, cells=cells)
            par_on = self.config.refine.par.enabled
            pseudo = pseudo_labels(refined, labels, images.float(), self.config.refine, use_par=par_on, valid=valid)
            return refined, pseudo

    def pseudo_label_variants(self, images: Tensor, labels: Tensor, iteration: int) -> dict[str, Tensor]:
        """Pseudo-labels (B, H, W) three ways: `cam` (raw CAMs), `cam_par` (PAR only), `refined`."""
        cams, features = compute_cams(
            self.encoder, self.classifier, self.encoder_input(images), labels, self.cam_block,
            self.config.model.cam_method,
        )
        with torch.no_grad():
            _, fused = self.decoder([features.blocks[i] for i in self.decoder_blocks], images.shape[-2:])
            _, refined = self.pseudo_labels(images, labels, cams, features, decoder_affinity(fused), iteration)
            raw = cams.float()
            return {
                "cam": pseudo_labels(raw, labels, images.float(), self.config.refine, use_par=False),
                "cam_par": pseudo_labels(raw, labels, images.float(), self.config.refine, use_par=True),
                "refined": refined,
            }

    def losses(self, output: ModelOutput) -> dict[str, Tensor]:
        """`loss` = L_seg + λ·L_aff, with both parts (scalars)."""
        cfg = self.config.loss
        grid = output.cams.shape[-2:]
        seg = segmentation_loss(output.logits.float(), output.pseudo, cfg.seg)
        aff = affinity_loss(output.aff_dec.float(), output.pseudo, grid, cfg.aff_radius, cfg.aff)
        return {"loss": total_loss(seg, aff, cfg.lam), "loss/seg": seg, "loss/aff": aff}

    @torch.no_grad()
    def predict(self, images: Tensor) -> Tensor:
        """Decoder logits (B, 21, H, W) for normalised images (B, 3, H, W); no CAMs needed."""
        features = self.encoder.encode_image(self.encoder_input(images))
        logits, _ = self.decoder([features.blocks[i] for i in self.decoder_blocks], images.shape[-2:])
        return logits


def build_model(config: Config, device: torch.device | str = "cpu") -> UniClAffSeg:
    """Encoder from the registry (with its checkpoint) wrapped into the method, on `device`."""
    checkpoint = default_checkpoint(config.model.encoder, config.model.checkpoint)
    encoder = build_encoder(config.model.encoder, checkpoint=checkpoint)
    return UniClAffSeg(encoder, config).to(device)
