"""Text prompts as a zero-shot classifier: class + background text features of a frozen encoder.

Logits are ``exp(logit_scale) * cos(image embedding, text feature)``; each class's text feature is
the re-normalised mean of its normalised prompt features over the templates.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from affseg.backbones.base import DualEncoder
from affseg.backbones.tokenizer import tokenize

DEFAULT_TEMPLATE = "a clean origami {}."
DEFAULT_TEMPLATES: tuple[str, ...] = (DEFAULT_TEMPLATE,)

# VOC class names that CLIP-style text encoders read better with a disambiguation; others as is.
PROMPT_NAMES: dict[str, str] = {
    "bird": "bird avian",
    "chair": "chair seat",
    "person": "person with clothes, people, human",
    "tvmonitor": "tvmonitor screen",
}

# Words for "not an object": added to the classifier so that background can win the softmax.
BACKGROUND_WORDS: tuple[str, ...] = (
    "ground", "land", "grass", "tree", "building", "wall", "sky", "lake", "water", "river", "sea",
    "railway", "railroad", "keyboard", "helmet", "cloud", "house", "mountain", "ocean", "road", "rock",
    "street", "valley", "bridge", "sign",
)  # fmt: skip


def prompt_name(class_name: str) -> str:
    """The name a class is prompted with (``PROMPT_NAMES`` disambiguation, else the name itself)."""
    return PROMPT_NAMES.get(class_name, class_name)


@torch.no_grad()
def class_text_features(encoder: DualEncoder, names: Sequence[str], templates: Sequence[str]) -> Tensor:
    """``(K, D)`` unit-norm text features of K names: every template filled with every name, encoded,
    L2-normalised, averaged over the templates and re-normalised. Computed on the encoder's device."""
    if not names:
        return torch.zeros(0, encoder.embed_dim)
    if not templates:
        raise ValueError("at least one prompt template is needed")
    device = next(encoder.parameters()).device
    prompts = [template.format(name) for name in names for template in templates]
    features = F.normalize(encoder.encode_text(tokenize(prompts).to(device)).float(), dim=-1)
    features = features.view(len(names), len(templates), -1).mean(dim=1)
    return F.normalize(features, dim=-1)


class ZeroShotClassifier:
    """Scores image embeddings against fixed class and background prompts.

    The ``(K_fg + K_bg, D)`` text features are computed once, at construction; foreground classes come
    first, in the given order, then the background words. Class names go through ``prompt_name``.
    Not an ``nn.Module``: it holds no parameters of its own and must not re-register the encoder's.
    """

    def __init__(
        self,
        encoder: DualEncoder,
        class_names: Sequence[str],
        background_words: Sequence[str] = BACKGROUND_WORDS,
        templates: Sequence[str] = DEFAULT_TEMPLATES,
    ):
        self.encoder = encoder
        self.class_names = [prompt_name(name) for name in class_names]
        self.background_words = list(background_words)
        self.num_foreground = len(self.class_names)
        self.text_features = class_text_features(encoder, self.class_names + self.background_words, templates)

    @property
    def num_classes(self) -> int:
        """K_fg + K_bg."""
        return self.text_features.shape[0]

    def logits(self, image_embedding: Tensor) -> Tensor:
        """``(B, D)`` image embeddings (not normalised) -> ``(B, K_fg + K_bg)`` scaled cosines.

        Differentiable w.r.t. ``image_embedding`` (Grad-CAM); the text side is constant.
        """
        if self.text_features.device != image_embedding.device:  # moved once, with the first batch
            self.text_features = self.text_features.to(image_embedding.device)
        text = self.text_features.to(image_embedding.dtype)
        scale = self.encoder.logit_multiplier().to(image_embedding.dtype)
        return scale * F.normalize(image_embedding, dim=-1) @ text.T
