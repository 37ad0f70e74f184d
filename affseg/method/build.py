"""Builders: the only place where a `Config` becomes a teacher, a student or a pseudo-labeler."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from affseg.backbones.demo_weights import default_checkpoint
from affseg.backbones.registry import build_encoder
from affseg.config import Config, ConfigError
from affseg.data.classes import VOC_CLASSES
from affseg.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from affseg.decoder import SegDecoder
from affseg.method.labeler import PseudoLabeler
from affseg.method.student import Student
from affseg.method.teacher import Teacher
from affseg.prompts import BACKGROUND_WORDS, ZeroShotClassifier

FOREGROUND_NAMES = list(VOC_CLASSES[1:])
FIRST_STAGE_STRIDE = 4  # Swin stage k (1-based) has stride 4 · 2^(k−1): 4, 8, 16, 32; a ViT's one grid is "stage 3"
STAGES = (1, 2, 3, 4)


def stage_stride(stage: int) -> int:
    return FIRST_STAGE_STRIDE * 2 ** (stage - 1)


def blocks_of_stages(encoder, stages: list[int], key: str) -> list[int]:
    """Encoder block indices of every block in the listed stages, in encoder order (SPEC §5.3).

    One-line ConfigError naming `model.<key>` when the encoder has no such stage (a CLIP ViT has only 3)."""
    strides = encoder.block_strides
    missing = [stage for stage in stages if stage_stride(stage) not in strides]
    if missing:
        present = [stage for stage in STAGES if stage_stride(stage) in strides]
        raise ConfigError(f"model.{key}: stage(s) {missing} not in this encoder (its stages: {present})")
    wanted = {stage_stride(stage) for stage in stages}
    return [index for index, stride in enumerate(strides) if stride in wanted]


def renormalisation(mean: tuple[float, ...], std: tuple[float, ...]) -> tuple[Tensor, Tensor]:
    """(scale, shift), each (1, 3, 1, 1), mapping ImageNet-normalised pixels to (x − mean) / std."""
    in_mean, in_std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    out_mean, out_std = torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)
    scale = in_std / out_std
    shift = (in_mean - out_mean) / out_std
    return scale.view(1, 3, 1, 1), shift.view(1, 3, 1, 1)


def select_blocks(candidates: list[int], chosen: list[int], key: str) -> list[int]:
    """Map indices among `candidates` (encoder block indices; negative allowed) to encoder block indices;
    [] = all of them."""
    if not chosen:
        return list(candidates)
    try:
        return [candidates[i] for i in chosen]
    except IndexError:
        raise ConfigError(f"model.{key}: {chosen} out of range for the {len(candidates)} blocks of its stages") from None


def check_block_counts(config: Config, affinity_blocks: int) -> None:
    """`refine.n0` and `refine.warmup_blocks` count affinity blocks: at most as many as the encoder has."""
    for name in ("n0", "warmup_blocks"):
        value = getattr(config.refine, name)
        if value > affinity_blocks:
            raise ConfigError(f"refine.{name}: {value} must lie in [1, {affinity_blocks}] "
                              f"(the affinity blocks of model.encoder={config.model.encoder})")


def build_teacher(config: Config, device: torch.device | str = "cpu", group: Sequence[Config] = ()) -> Teacher:
    """Encoder from the registry (with its checkpoint) wrapped into the frozen teacher, on `device`.

    Only the encoder affinities a pseudo-labeler reads are computed: the last max(refine.n0,
    refine.warmup_blocks) of the selected blocks, over `config` and the other members of its fused `group`.
    """
    cfg = config.model
    encoder = build_encoder(cfg.encoder, checkpoint=default_checkpoint(cfg.encoder, cfg.checkpoint))
    grid_blocks = encoder.stage_blocks(encoder.grid_stride)
    cam_block = select_blocks(grid_blocks, [encoder.default_cam_block if cfg.cam_block is None else cfg.cam_block],
                              "cam_block")[0]
    affinity_blocks = select_blocks(blocks_of_stages(encoder, cfg.affinity_stages, "affinity_stages"),
                                    cfg.affinity_blocks, "affinity_blocks")
    members = [config, *group]
    for member in members:
        check_block_counts(member, len(affinity_blocks))
    count = max(max(member.refine.n0, member.refine.warmup_blocks) for member in members)
    background = list(BACKGROUND_WORDS) if cfg.background_prompts else []
    classifier = ZeroShotClassifier(encoder, FOREGROUND_NAMES, background, [cfg.prompt_template])
    scale, shift = renormalisation(encoder.image_mean, encoder.image_std)
    teacher = Teacher(encoder, classifier, cam_block, cfg.cam_method,
                      select_blocks(blocks_of_stages(encoder, cfg.decoder_stages, "decoder_stages"),
                                    cfg.decoder_blocks, "decoder_blocks"),
                      affinity_blocks[-count:], scale, shift)
    return teacher.to(device)


def build_student(config: Config, teacher: Teacher) -> Student:
    """A fresh decoder on the teacher's decoder blocks, on the teacher's device (draws from the global RNG)."""
    cfg = config.model
    dims = teacher.encoder.block_dims()
    decoder = SegDecoder([dims[i] for i in teacher.decoder_blocks], dim=cfg.decoder_dim, mlp_dim=cfg.decoder_mlp_dim,
                         depth=cfg.decoder_layers, heads=cfg.decoder_heads, mlp_ratio=cfg.decoder_mlp_ratio,
                         dropout=cfg.decoder_dropout)
    return Student(decoder).to(teacher.input_scale.device)


def refine_start_iteration(config: Config) -> int:
    """The first iteration at which A_f joins: ceil(refine.refine_start · train.iterations)."""
    return math.ceil(config.refine.refine_start * config.train.iterations)


def build_pseudo_labeler(config: Config) -> PseudoLabeler:
    return PseudoLabeler(config.refine, refine_start_iteration(config))
