"""CLIP ViT from a Hugging Face folder (``CLIPModel.save_pretrained``, e.g. ``openai/clip-vit-base-patch16``).

The same encoder as :mod:`affseg.backbones.clip_vit` (open_clip on an OpenAI TorchScript file), built on
``transformers.CLIPModel``: ``blocks[k]`` are the patch tokens leaving ``vision_model.encoder.layers[k]``
(HF's ``hidden_states[k + 1]``), class token dropped, all at the patch stride; the embedding is
``visual_projection(post_layernorm(class token))`` (HF's ``get_image_features``); text features are
``get_text_features`` of our CLIP BPE ids. Block order and count are those of the open_clip path, so
block indices (``model.cam_block``, ``decoder_blocks``, ``affinity_blocks``) mean the same on both.

Other input sizes: zero-padded on the bottom/right to a multiple of the patch size (maps cropped back) and
the position embeddings resampled bicubically (``align_corners=False``, class slot kept) to the padded grid.
For H, W multiples of the patch size this is exactly HF's ``interpolate_pos_encoding=True``; for other
sizes HF's patch convolution drops the last ``H mod p`` rows / ``W mod p`` columns, while we pad, so that
the ``ceil(H / 16) x ceil(W / 16)`` grid covers every pixel (SPEC §5.1): ours equals HF on the padded image.

Trust: ``load_hf_clip`` reads only local files (``local_files_only``, never the network, never remote
code). Weights come from ``model.safetensors`` when the folder has it: safetensors is a plain tensor
format, reading it executes no code. Only a folder without it falls back to ``pytorch_model.bin``,
which transformers reads with ``torch.load(weights_only=True)`` (tensors only, no arbitrary objects).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from torch import Tensor
from transformers import CLIPConfig, CLIPModel
from transformers.utils import logging as hf_logging

from affseg.backbones.base import DualEncoder, ImageFeatures, grad_mode, pad_to_multiple, valid_size
from affseg.backbones.checkpoint import MAX_LISTED, CheckpointError, _one_line, check_state_dict
from affseg.backbones.clip_vit import (
    HEAD_WIDTH, ClipConfig, ClipVitEncoder, resample_position_embedding, vit_block_maps,
)
from affseg.backbones.tokenizer import CONTEXT_LENGTH, EOT_TOKEN_ID, VOCAB_SIZE

CONFIG_FILE = "config.json"
CLIP_MODEL_TYPE = "clip"  # config.json "model_type" of a CLIPModel folder
SAFETENSORS_FILES = ("model.safetensors", "model.safetensors.index.json")  # single file / sharded
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
# configs written before transformers PR #24773 say eos_token_id=2: HF then pools the text at argmax(ids),
# which for our ids is the EOT (49407, the largest id), like the newer eos_token_id=49407 pooling
LEGACY_EOS_TOKEN_ID = 2
POOLABLE_EOS_IDS = (LEGACY_EOS_TOKEN_ID, EOT_TOKEN_ID)
MLP_RATIO = 4  # OpenAI CLIP: MLP width = 4 * width in both towers
HF_HINT = (
    "hint: wrong folder, or wrong encoder name: ViT-B/16 is a CLIPModel.save_pretrained folder of "
    "openai/clip-vit-base-patch16 (encoder 'clip_vit_b16')"
)


class HfClipEncoder(DualEncoder):
    """``transformers.CLIPModel`` (ViT image tower) behind the ``DualEncoder`` interface, held as ``self.model``."""

    image_mean = OPENAI_DATASET_MEAN  # = the image_mean / image_std of OpenAI's HF preprocessor_config.json
    image_std = OPENAI_DATASET_STD
    default_cam_block = ClipVitEncoder.default_cam_block  # the same Grad-CAM target as the TorchScript path

    def __init__(self, model: CLIPModel, name: str = "hf_clip"):
        super().__init__()
        self.name = name
        self.model = model
        vision = model.config.vision_config
        self.embed_dim = model.config.projection_dim
        self.patch_size = vision.patch_size
        self.native_grid = (vision.image_size // vision.patch_size,) * 2  # grid of the learned position embeddings
        self.block_strides = (vision.patch_size,) * vision.num_hidden_layers
        self.block_channels = (vision.hidden_size,) * vision.num_hidden_layers

    def encode_image(self, images: Tensor, grad_block: int | None = None) -> ImageFeatures:
        """``(B, 3, H, W)`` CLIP-normalised images, any H, W -> one map per layer at the patch stride + ``(B, D)``.

        As ``ClipVitEncoder.encode_image``: with ``grad_block=k`` the class token leaving layer ``k`` is
        detached, so ``k`` must not be the last layer for the embedding to depend on ``blocks[k]``.
        """
        self._check_grad_block(grad_block)
        vision = self.model.vision_model
        embeddings = vision.embeddings
        batch = images.shape[0]
        valid = valid_size(*images.shape[-2:], self.patch_size)
        with grad_mode(grad_block, 0):
            pixels = pad_to_multiple(images, self.patch_size).to(embeddings.patch_embedding.weight.dtype)
            patches = embeddings.patch_embedding(pixels)  # (B, C, gh, gw)
            grid = tuple(patches.shape[-2:])
            tokens = patches.flatten(2).transpose(1, 2)
            class_token = embeddings.class_embedding.to(tokens.dtype).expand(batch, 1, -1)
            position = resample_position_embedding(embeddings.position_embedding.weight, self.native_grid, grid)
            x = vision.pre_layrnorm(torch.cat([class_token, tokens], dim=1) + position.to(tokens.dtype))

        layers = [lambda hidden, layer=layer: layer(hidden, None) for layer in vision.encoder.layers]  # no mask
        blocks, x = vit_block_maps(x, layers, grid, valid, grad_block)
        with grad_mode(grad_block, len(blocks)):
            embedding = self.model.visual_projection(vision.post_layernorm(x[:, 0]))
        return ImageFeatures(blocks=blocks, block_strides=list(self.block_strides), embedding=embedding)

    def encode_text(self, tokens: Tensor) -> Tensor:
        """``(N, 77)`` token ids -> ``(N, D)``, not normalised (pooled at the EOT token)."""
        if tokens.ndim != 2 or tokens.shape[1] != CONTEXT_LENGTH:
            raise ValueError(f"expected token ids of shape (N, {CONTEXT_LENGTH}), got {tuple(tokens.shape)}")
        return self.model.get_text_features(input_ids=tokens).pooler_output

    def logit_multiplier(self) -> Tensor:
        return self.model.logit_scale.exp()


def is_hf_folder(checkpoint: str | os.PathLike) -> bool:
    """Whether ``model.checkpoint`` names a folder (Hugging Face layout) rather than a file."""
    return Path(checkpoint).is_dir()


def architecture(config: CLIPConfig) -> dict[str, int]:
    """The shape of a ``CLIPConfig`` as ``{'vision_config.hidden_size': 768, ...}`` (config.json names)."""
    shape = {"projection_dim": config.projection_dim}
    for tower in ("vision_config", "text_config"):
        tower_config = getattr(config, tower)
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
            shape[f"{tower}.{key}"] = getattr(tower_config, key)
    shape["vision_config.patch_size"] = config.vision_config.patch_size
    shape["vision_config.image_size"] = config.vision_config.image_size
    return shape


def expected_architecture(config: ClipConfig) -> dict[str, int]:
    """``architecture`` of the OpenAI CLIP shaped like ``config`` (64-wide heads, MLP 4x)."""
    shape = {"projection_dim": config.embed_dim}
    for tower, width, layers in (
        ("vision_config", config.vision_width, config.vision_layers),
        ("text_config", config.text_width, config.text_layers),
    ):
        shape[f"{tower}.hidden_size"] = width
        shape[f"{tower}.num_hidden_layers"] = layers
        shape[f"{tower}.num_attention_heads"] = width // HEAD_WIDTH
        shape[f"{tower}.intermediate_size"] = MLP_RATIO * width
    shape["vision_config.patch_size"] = config.patch_size
    shape["vision_config.image_size"] = config.image_size
    return shape


def read_config(folder: Path) -> CLIPConfig:
    """``folder/config.json`` as a ``CLIPConfig``; ``CheckpointError`` unless it is a CLIPModel config."""
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: not found: a Hugging Face CLIP folder has config.json ({HF_HINT})")
    try:
        model_type = json.loads(path.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError) as error:
        raise CheckpointError(f"{path}: cannot read ({_one_line(error)}); write the folder again") from error
    if model_type != CLIP_MODEL_TYPE:
        raise CheckpointError(f"{path}: model_type is {model_type!r}, not '{CLIP_MODEL_TYPE}' (a CLIPModel); {HF_HINT}")
    return CLIPConfig.from_pretrained(folder, local_files_only=True)


def check_text_fits_tokenizer(path: Path, config: CLIPConfig) -> None:
    """Our ids (CLIP BPE, 49,408 tokens, 77 long, EOT 49407) must index and pool this text tower as CLIP's."""
    text = config.text_config
    problems = []
    if text.vocab_size != VOCAB_SIZE:
        problems.append(f"text_config.vocab_size {text.vocab_size} (CLIP BPE: {VOCAB_SIZE})")
    if text.max_position_embeddings < CONTEXT_LENGTH:
        problems.append(f"text_config.max_position_embeddings {text.max_position_embeddings} < {CONTEXT_LENGTH}")
    if text.eos_token_id not in POOLABLE_EOS_IDS:
        problems.append(f"text_config.eos_token_id {text.eos_token_id} (expected one of {POOLABLE_EOS_IDS})")
    if problems:
        raise CheckpointError(f"{path}: text tower does not fit the CLIP tokenizer: {', '.join(problems)}")


def check_architecture(path: Path, config: CLIPConfig, expected: ClipConfig) -> None:
    """``CheckpointError`` listing every config.json value that differs from ``expected``'s shape."""
    found, wanted = architecture(config), expected_architecture(expected)
    differences = [f"{key} {found[key]} vs {wanted[key]}" for key in wanted if found[key] != wanted[key]]
    if differences:
        shown = ", ".join(differences[:MAX_LISTED]) + (", ..." if len(differences) > MAX_LISTED else "")
        raise CheckpointError(f"{path}: not the architecture of '{expected.name}' (folder vs encoder: {shown}); {HF_HINT}")


def uses_safetensors(folder: Path) -> bool:
    """True for a folder with safetensors weights, False for one with only ``pytorch_model.bin``."""
    if any((folder / name).is_file() for name in SAFETENSORS_FILES):
        return True
    if any((folder / name).is_file() for name in PICKLE_FILES):
        return False
    raise CheckpointError(f"{folder}: no weights: expected {SAFETENSORS_FILES[0]} (or {PICKLE_FILES[0]}) next to {CONFIG_FILE}")


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' progress bars and load report; a problem is reported by us, in one line."""
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def check_loading_info(folder: Path, model: CLIPModel, info: dict) -> None:
    """Strict load: ``CheckpointError`` naming missing, unexpected and mis-shaped weights (``check_state_dict``).

    ``info`` is ``from_pretrained``'s ``output_loading_info``; the folder's keys and shapes are rebuilt from it
    (HF already ignores the obsolete ``position_ids`` buffers old files carry).
    """
    expected = model.state_dict()
    file_shapes = {key: shape for key, shape, _ in info["mismatched_keys"]}
    found = {
        key: torch.empty(file_shapes[key], device="meta") if key in file_shapes else value
        for key, value in expected.items()
        if key not in info["missing_keys"]
    }
    found.update({key: torch.empty(0, device="meta") for key in sorted(info["unexpected_keys"])})
    check_state_dict(folder, found, expected, hint=HF_HINT)


def load_hf_clip(folder: str | os.PathLike, expected: ClipConfig | None = None) -> HfClipEncoder:
    """``CLIPModel.from_pretrained(folder)`` (local, fp32, CPU, strict) as an ``HfClipEncoder``.

    Args:
        folder: what ``CLIPModel.save_pretrained`` wrote: ``config.json`` + ``model.safetensors``.
        expected: the registry's architecture the folder must have (None: any CLIP ViT).

    Raises:
        CheckpointError: one line naming the folder / file and the first mismatching keys or values.
    """
    folder = Path(folder)
    config = read_config(folder)
    check_text_fits_tokenizer(folder / CONFIG_FILE, config)
    if expected is not None:
        check_architecture(folder / CONFIG_FILE, config, expected)
    safetensors = uses_safetensors(folder)
    try:
        with quiet_transformers():
            model, info = CLIPModel.from_pretrained(
                folder,
                config=config,
                local_files_only=True,
                use_safetensors=safetensors,
                weights_only=True,
                dtype=torch.float32,
                ignore_mismatched_sizes=True,  # reported by check_loading_info, with the keys
                output_loading_info=True,
            )
    except Exception as error:  # unreadable / truncated weight files: transformers raises OSError, RuntimeError, ...
        raise CheckpointError(f"{folder}: cannot load the CLIP weights ({_one_line(error)}); {HF_HINT}") from error
    check_loading_info(folder, model, info)
    return HfClipEncoder(model, name=folder.name if expected is None else expected.name)
