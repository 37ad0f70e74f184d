"""The pseudo-labeler: teacher output + A_f (from `refine_start` on) + refinement settings → pseudo-labels."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from affseg.config import RefineConfig
from affseg.method.teacher import TeacherOutput
from affseg.refine.par import ParKernel, image_kernel, par
from affseg.refine.pseudo import LabelScores, checked_refine_cams, label_scores, labels_from_scores, pseudo_labels


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
        return refine_together([self], teacher, [aff_dec], iteration)[0]

    def par_settings(self) -> tuple | None:
        """What PAR's result depends on besides the maps (None when PAR is off): heads with equal settings
        can run PAR as one call."""
        p = self.settings.par
        return (tuple(p.dilations), p.w1, p.w2, p.scale, p.iterations) if p.enabled else None

    def _scores(self, teacher: TeacherOutput, aff_dec: Tensor, iteration: int) -> tuple[Tensor, Tensor, LabelScores]:
        """(refined maps, converged, pixel scores before PAR) under autocast off."""
        refined, converged = self._refine(teacher, aff_dec, iteration)
        scored = label_scores(refined, teacher.labels, tuple(teacher.images.shape[-2:]), self.settings,
                              valid=teacher.valid, slots=teacher.slots)
        return refined, converged, scored

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


@torch.no_grad()
def refine_together(labelers: list[PseudoLabeler], teacher: TeacherOutput, aff_decs: list[Tensor],
                    iteration: int) -> list[Refinement]:
    """Each labeler's `Refinement` of one teacher pass (a fused group's heads), aff_decs[i] its student's A_f.

    The labelers whose PAR settings are equal run PAR as one call over all their maps: the maps are columns
    of one pixel table, each column's result is what the map gets alone (bit for bit), and PAR's cost
    hardly grows with the number of columns, so a group pays about one PAR, not one per head."""
    with torch.autocast(teacher.images.device.type, enabled=False):
        pending = [labeler._scores(teacher, aff_dec, iteration) for labeler, aff_dec in zip(labelers, aff_decs)]
        groups: dict[tuple, list[int]] = {}
        for index, labeler in enumerate(labelers):
            if (settings := labeler.par_settings()) is not None:
                groups.setdefault(settings, []).append(index)
        images = teacher.images.float()
        for members in groups.values():
            first = labelers[members[0]]
            p = first.settings.par
            maps = [pending[index][2].scores for index in members]
            after_par = par(images, torch.cat(maps, dim=1), p.dilations, p.iterations, p.w1, p.w2, p.scale,
                            kernel=first._par_kernel(teacher))
            for index, part in zip(members, after_par.split([m.shape[1] for m in maps], dim=1)):
                pending[index][2].scores = part
        return [Refinement(refined=refined, converged=converged,
                           pseudo=labels_from_scores(scored, labeler.settings, labeler.settings.par.enabled,
                                                     valid=teacher.valid))
                for labeler, (refined, converged, scored) in zip(labelers, pending)]
