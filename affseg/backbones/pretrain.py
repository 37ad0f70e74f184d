"""UniCL contrastive pre-training (paper eq. 3.1–3.3) in the image-label form, for tiny encoders offline.

A batch holds B images and the K prompts of every class and background word. Image i and
prompt k are a positive pair iff k names one of i's classes or its background; so a
multi-label image has several positives and a prompt several images. The loss is the
bidirectional UniCL loss: for each image, the mean log-softmax (over prompts) of its positives;
for each prompt with positives in the batch, the mean log-softmax (over images) of its images.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from affseg.backbones.registry import build_encoder
from affseg.backbones.tokenizer import tokenize
from affseg.backbones.checkpoint import save_unicl
from affseg.data.classes import NUM_FOREGROUND, VOC_CLASSES
from affseg.data.demo import BACKGROUND_FILE, DEMO_VERSION, VERSION_FILE
from affseg.data.transforms import TrainAugment
from affseg.data.voc import VocLayout, load_cls_labels, read_ids, read_image, read_mask
from affseg.prompts import BACKGROUND_WORDS, PROMPT_NAMES

PRETRAIN_TEMPLATES = ("a clean origami {}.", "a photo of a {}.")  # the first is the CAM prompt
INITIAL_LOGIT_SCALE = math.log(1 / 0.07)  # CLIP's initial temperature
MAX_LOGIT_SCALE = math.log(100.0)


@dataclass
class PretrainConfig:
    """One-off contrastive pre-training of a tiny encoder on the demo set."""

    root: str = "data/demo/VOCdevkit/VOC2012"  # the demo set in VOC layout (`affseg make-demo` writes it)
    encoder: str = "unicl_swin_tiny"  # registry name of the encoder to pre-train from random weights
    out: str = "affseg/assets/unicl_swin_tiny_demo.pth"  # checkpoint (published layout) + a .json record beside it
    steps: int = 3000  # length of the warm-up + cosine schedule, in optimiser steps
    stop_after: int = 0  # 0 = all steps; k = stop (and save) after step k of the `steps` schedule
    batch_size: int = 32  # images per step (their texts: all class prompts + background words)
    lr: float = 5e-4  # AdamW peak learning rate
    weight_decay: float = 0.05  # AdamW weight decay
    warmup_steps: int = 100  # linear warm-up steps before the cosine decay
    image_size: int = 96  # side of the square random crop, in pixels
    scale_min: float = 0.6  # smallest random rescale factor before the crop
    scale_max: float = 1.0  # largest random rescale factor before the crop
    seed: int = 0  # seed of weights, crops and batch order
    eval_every: int = 150  # zero-shot evaluation (and checkpoint) every this many steps
    threads: int = 0  # torch CPU threads; 0 = torch's default


def prompt_vocabulary() -> list[str]:
    """Prompt subjects: the 20 VOC class names (disambiguated) then the background words."""
    return [PROMPT_NAMES.get(name, name) for name in VOC_CLASSES[1:]] + list(BACKGROUND_WORDS)


def positive_matrix(labels: torch.Tensor, background_ids: torch.Tensor, num_prompts: int) -> torch.Tensor:
    """(B, 20) multi-hot labels + (B,) background-word index (−1 = none) → (B, K) bool positives."""
    positives = torch.zeros(labels.shape[0], num_prompts, dtype=torch.bool, device=labels.device)
    positives[:, :NUM_FOREGROUND] = labels > 0.5
    has_bg = background_ids >= 0
    rows = torch.nonzero(has_bg).squeeze(1)
    positives[rows, NUM_FOREGROUND + background_ids[has_bg]] = True
    return positives


def unicl_loss(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Bidirectional UniCL loss. logits (B, K) = scale · cos; positives (B, K) bool. Returns a scalar.

    i2t: mean over images of −mean_{k∈P(i)} log softmax_k(logits[i]);
    t2i: mean over prompts with ≥1 positive of −mean_{i∈P(k)} log softmax_i(logits[:, k]).
    """
    pos = positives.float()
    i2t = -(F.log_softmax(logits, dim=1) * pos).sum(1) / pos.sum(1).clamp(min=1)
    t2i = -(F.log_softmax(logits, dim=0) * pos).sum(0) / pos.sum(0).clamp(min=1)
    image_rows = pos.sum(1) > 0
    text_cols = pos.sum(0) > 0
    return i2t[image_rows].mean() + t2i[text_cols].mean()


class DemoImages:
    """The demo split in memory: uint8 images, masks, multi-hot labels, background-word ids."""

    def __init__(self, root: Path, split: str):
        layout = VocLayout(root)
        self.ids = read_ids(layout, split)
        labels = load_cls_labels(root / "cls_labels_onehot.npy")
        backgrounds = json.loads((root / BACKGROUND_FILE).read_text()) if (root / BACKGROUND_FILE).is_file() else {}
        self.images = [read_image(layout.image(i)) for i in self.ids]
        self.masks = [read_mask(layout.mask(i)) for i in self.ids]
        self.labels = torch.from_numpy(np.stack([labels[i] for i in self.ids]))
        words = list(BACKGROUND_WORDS)
        self.background_ids = torch.tensor([words.index(backgrounds[i]) if i in backgrounds else -1 for i in self.ids])


def read_demo_version(root: Path) -> dict:
    path = root / VERSION_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def _lr_at(step: int, config: PretrainConfig) -> float:
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.lr * 0.5 * (1 + math.cos(math.pi * progress))


def text_features(encoder, templates: tuple[str, ...], subjects: list[str]) -> torch.Tensor:
    """(K, D) normalised prompt features averaged over templates (with grad)."""
    tokens = tokenize([t.format(s) for t in templates for s in subjects])
    feats = F.normalize(encoder.encode_text(tokens), dim=-1).view(len(templates), len(subjects), -1)
    return F.normalize(feats.mean(0), dim=-1)


@torch.no_grad()
def evaluate_zero_shot(encoder, data: DemoImages, batch_size: int = 64) -> dict[str, float]:
    """Zero-shot multi-label mAP over the classes present in `data`, and top-1 on single-object images."""
    from sklearn.metrics import average_precision_score

    from affseg.data.transforms import normalise

    encoder.eval()
    subjects = prompt_vocabulary()
    text = text_features(encoder, ("a clean origami {}.",), subjects)[:NUM_FOREGROUND]
    scores = []
    for start in range(0, len(data.images), batch_size):
        batch = torch.stack([normalise(im) for im in data.images[start : start + batch_size]])
        image = F.normalize(encoder.encode_image(batch).embedding, dim=-1)
        scores.append(image @ text.T)
    scores = torch.cat(scores).numpy()
    labels = data.labels.numpy()
    used = labels.sum(0) > 0
    ap = [average_precision_score(labels[:, c], scores[:, c]) for c in np.flatnonzero(used)]
    single = labels.sum(1) == 1
    top1 = (scores[single][:, used].argmax(1) == labels[single][:, used].argmax(1)).mean()
    chance = float(np.mean([labels[:, c].mean() for c in np.flatnonzero(used)]))
    encoder.train()
    return {"map": float(np.mean(ap)), "map_chance": chance, "top1_single": float(top1)}


def pretrain(config: PretrainConfig, log=print) -> dict:
    """Train `config.encoder` from scratch on the demo set; write it in the published UniCL layout."""
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    root = Path(config.root)
    train, val = DemoImages(root, "train_aug"), DemoImages(root, "val")
    encoder = build_encoder(config.encoder)
    encoder.requires_grad_(True)
    encoder.train()  # after unfreezing: a frozen DualEncoder ignores train()
    with torch.no_grad():
        encoder.logit_scale.fill_(INITIAL_LOGIT_SCALE)
    optimiser = torch.optim.AdamW(encoder.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    augment = TrainAugment(config.image_size, config.scale_min, config.scale_max)
    rng = np.random.default_rng(config.seed)
    subjects = prompt_vocabulary()
    losses: list[float] = []
    history = []
    start = time.time()
    last_step = config.stop_after or config.steps
    for step in range(last_step):
        for group in optimiser.param_groups:
            group["lr"] = _lr_at(step, config)
        index = rng.choice(len(train.images), size=config.batch_size, replace=False)
        pairs = [augment(train.images[i], train.masks[i], rng) for i in index]
        images = torch.stack([p[0] for p in pairs])
        template = PRETRAIN_TEMPLATES[rng.integers(len(PRETRAIN_TEMPLATES))]
        text = text_features(encoder, (template,), subjects)
        image = F.normalize(encoder.encode_image(images).embedding, dim=-1)
        logits = encoder.logit_multiplier() * image @ text.T
        positives = positive_matrix(train.labels[index], train.background_ids[index], len(subjects))
        loss = unicl_loss(logits, positives)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        with torch.no_grad():
            encoder.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        losses.append(loss.item())
        if (step + 1) % config.eval_every == 0 or step + 1 == last_step:
            scores = evaluate_zero_shot(encoder, val)
            record = {"step": step + 1, "loss": float(np.mean(losses[-config.eval_every :])),
                      "minutes": (time.time() - start) / 60, **scores}
            history.append(record)
            log(json.dumps(record))
            summary = _save(encoder, config, history, losses, step + 1)
    return summary


def _save(encoder, config: PretrainConfig, history: list[dict], losses: list[float], steps_done: int) -> dict:
    """Write the checkpoint (published layout, fp16) and its JSON record; returns the record.

    Saved at every evaluation, so an interrupted run leaves a usable checkpoint whose record says
    how to rebuild it exactly (`--stop-after steps_done`)."""
    demo = read_demo_version(Path(config.root))
    rebuild = {**asdict(config), "stop_after": steps_done if steps_done < config.steps else 0}
    summary = {
        "config": rebuild,
        "steps_done": steps_done,
        "demo_version": demo.get("version", DEMO_VERSION),
        "demo_seed": demo.get("seed"),
        "first_loss": float(np.mean(losses[: config.eval_every])),
        "history": history,
        "command": "affseg pretrain " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in rebuild.items()),
    }
    Path(config.out).parent.mkdir(parents=True, exist_ok=True)
    save_unicl(encoder, config.out, extra={"pretrain": summary}, half=True)
    Path(config.out).with_suffix(".json").write_text(json.dumps(summary, indent=2))
    return summary
