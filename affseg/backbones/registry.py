"""Build a frozen dual encoder by name: ``build_encoder('unicl_swin_b', checkpoint=path)``."""

from __future__ import annotations

import os

from affseg.backbones.base import DualEncoder
from affseg.backbones.checkpoint import load_openai_clip, load_unicl
from affseg.backbones.clip_vit import CLIP_CONFIGS, ClipVitEncoder
from affseg.backbones.hf_clip import is_hf_folder, load_hf_clip
from affseg.backbones.unicl import UNICL_CONFIGS, UniCLEncoder
from affseg.config import ConfigError

ENCODER_NAMES: tuple[str, ...] = (*UNICL_CONFIGS, *CLIP_CONFIGS)


def check_encoder_name(name: str) -> None:
    """ConfigError (one line, naming `model.encoder` and the registered names) unless `name` is registered."""
    if name not in ENCODER_NAMES:
        raise ConfigError(f"model.encoder: unknown encoder {name!r}; choose one of: {', '.join(ENCODER_NAMES)}")


def build_encoder(name: str, checkpoint: str | os.PathLike | None = None) -> DualEncoder:
    """A frozen (``requires_grad=False``, eval mode) encoder on CPU.

    Args:
        name: one of ``ENCODER_NAMES``: ``unicl_swin_b``, ``unicl_swin_tiny``, ``clip_vit_b16``, ``clip_vit_tiny``.
        checkpoint: weights to load strictly (UniCL: published layout; CLIP: OpenAI file, or a Hugging Face
            ``CLIPModel.save_pretrained`` folder with ``config.json``); None gives random weights.

    Raises:
        ConfigError: unknown name. ``CheckpointError`` (a ValueError): unreadable or mismatching file.
    """
    if name in UNICL_CONFIGS:
        encoder: DualEncoder = UniCLEncoder(UNICL_CONFIGS[name])
        if checkpoint is not None:
            load_unicl(checkpoint, encoder)
    elif name in CLIP_CONFIGS:
        config = CLIP_CONFIGS[name]
        if checkpoint is None:
            encoder = ClipVitEncoder(config)
        elif is_hf_folder(checkpoint):
            encoder = load_hf_clip(checkpoint, config)
        else:
            encoder = load_openai_clip(checkpoint, config)
    else:
        check_encoder_name(name)
    return encoder.freeze()
