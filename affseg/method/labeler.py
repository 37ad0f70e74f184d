"""The pseudo-labeler: teacher output + A_f (from `refine_start` on) + refinement settings → pseudo-labels."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from affseg.config import RefineConfig
from affseg.method.teacher import TeacherOutput
from affseg.refine.par import ParKernel, image_kernel
from affseg.refine.pseudo import checked_refine_cams, pseudo_labels


@dataclass
class Refinement:
    """refined (B, 20, h, w) random-walk maps; pseudo (B, H, W) int64 VOC indices (255 = ignore);
    converged () bool on the device: the box masks' connected components reached their fixed point."""

    refined: Tensor
    pseudo: Tensor
    converged: Tensor


class PseudoLabeler:
    """One configuration's refinement. `refine_start`: the first iteration at which A_f joins (SPEC §2.4 step 7).

    Always float32: autocast is switched off here, since under it the affinity products and the random
    walk would run in bf16/fp16 whatever the dtype of their inputs.
    """

    def __init__(self, settings: RefineConfig, refine_start: int):
        self.settings = settings
        self.refine_start = refine_start

    def uses_decoder(self, iteration: int) -> bool:
        """Whether A_f joins the refinement at `iteration` (optimiser steps done)."""
        return iteration >= self.refine_start

    @torch.no_grad()
    def __call__(self, teacher: TeacherOutput, aff_dec: Tensor, iteration: int) -> Refinement:
        """aff_dec (B, N, N): the student's A_f (detached here)."""
        with torch.autocast(teacher.images.device.type, enabled=False):
            refined, converged = self._refine(teacher, aff_dec, iteration)
            use_par = self.settings.par.enabled
            pseudo = pseudo_labels(refined, teacher.labels, teacher.images.float(), self.settings, use_par=use_par,
                                   valid=teacher.valid, par_kernel=self._par_kernel(teacher) if use_par else None,
                                   slots=teacher.slots)
        return Refinement(refined=refined, pseudo=pseudo, converged=converged)

    @torch.no_grad()
    def variants(self, teacher: TeacherOutput, aff_dec: Tensor, iteration: int) -> dict[str, Tensor]:
        """Pseudo-labels (B, H, W) three ways: `cam` (raw CAMs), `cam_par` (PAR only), `refined` (training's)."""
        with torch.autocast(teacher.images.device.type, enabled=False):
            images, raw, labels = teacher.images.float(), teacher.cams.float(), teacher.labels
            kernel = self._par_kernel(teacher)
            return {
                "cam": pseudo_labels(raw, labels, images, self.settings, use_par=False, valid=teacher.valid,
                                     slots=teacher.slots),
                "cam_par": pseudo_labels(raw, labels, images, self.settings, use_par=True, valid=teacher.valid,
                                         par_kernel=kernel, slots=teacher.slots),
                "refined": self(teacher, aff_dec, iteration).pseudo,
            }

    def _par_kernel(self, teacher: TeacherOutput) -> ParKernel:
        """PAR's image kernel of this batch under these settings, shared with every head that has the same."""
        p = self.settings.par
        key = ("par_kernel", tuple(p.dilations), p.w1, p.w2, p.scale)
        if key not in teacher.shared:
            teacher.shared[key] = image_kernel(teacher.images.float(), p.dilations, p.w1, p.w2, p.scale)
        return teacher.shared[key]

    def _refine(self, teacher: TeacherOutput, aff_dec: Tensor, iteration: int) -> tuple[Tensor, Tensor]:
        decoder_aff = aff_dec.detach().float() if self.uses_decoder(iteration) else None
        return checked_refine_cams(teacher.cams.float(), teacher.aff_enc, decoder_aff, self.settings, cells=teacher.cells)
