"""Frozen vision-language encoders (UniCL Swin, CLIP ViT) behind one interface, and their tokenizer."""

from affseg.backbones.base import GRID_STRIDE, DualEncoder, ImageFeatures
from affseg.backbones.checkpoint import CheckpointError, load_openai_clip, load_unicl, save_unicl
from affseg.backbones.registry import ENCODER_NAMES, build_encoder
from affseg.backbones.tokenizer import CONTEXT_LENGTH, tokenize

__all__ = [
    "CONTEXT_LENGTH",
    "ENCODER_NAMES",
    "GRID_STRIDE",
    "CheckpointError",
    "DualEncoder",
    "ImageFeatures",
    "build_encoder",
    "load_openai_clip",
    "load_unicl",
    "save_unicl",
    "tokenize",
]
