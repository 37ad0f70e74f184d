"""Offline demo dataset in the exact VOC2012 layout.

Each image holds one or two large objects of a VOC class on a textured, named
background. An object's body has a colour shared by all classes; only a
*marking* (a patterned patch of a class-specific colour covering about a
quarter of the body) tells the class. A classifier trained on image labels
alone therefore attends to the marking, while the whole body is recoverable
from colour and feature affinity: the gap the refinement exists to close.

Demo numbers are not VOC numbers: this set only exercises the real code path.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from affseg.data.classes import NUM_FOREGROUND, VOC_CLASSES, voc_palette

# Bump when the generator's output changes (and update DEMO_FINGERPRINT): the committed demo
# encoder records the version it was pre-trained on.
DEMO_VERSION = 2
DEMO_FINGERPRINT = "e18a19477642a222b1bea920b7c26b11351cd1459fdca019611494e44d120a2e"  # generator_fingerprint(0)

IMAGE_SIZE = 160
TRAIN_IMAGES = 800
VAL_IMAGES = 200
TEST_IMAGES = 40
MAX_OBJECTS = 2
OBJECT_RADIUS = (34, 52)  # px, radius of the body before shape noise
MARK_FRACTION = 0.6  # marking disk radius as a fraction of the body radius (~36 % of its area)

# Foreground classes used by the demo (VOC indices), each with its marking colour and pattern.
DEMO_CLASSES: dict[str, tuple[tuple[int, int, int], str]] = {
    "aeroplane": ((220, 30, 30), "hstripes"),
    "bus": ((30, 60, 220), "vstripes"),
    "cat": ((20, 160, 40), "checker"),
    "cow": ((140, 20, 160), "dots"),
    "dog": ((0, 150, 150), "diagonal"),
    "sheep": ((20, 20, 20), "rings"),
}
# Body colours shared by every class, chosen apart from the background textures.
BODY_COLOURS = ((235, 205, 70), (245, 150, 50), (240, 130, 180), (235, 235, 225), (180, 140, 230))
BACKGROUNDS = ("grass", "sky", "wall", "water", "road")
BACKGROUND_FILE = "demo_backgrounds.json"  # id -> background word, used by encoder pre-training
VERSION_FILE = "demo_version.json"


@dataclass(frozen=True)
class DemoSpec:
    """What `make_demo` generates; defaults are the committed demo set."""

    seed: int = 0
    train: int = TRAIN_IMAGES
    val: int = VAL_IMAGES
    test: int = TEST_IMAGES
    size: int = IMAGE_SIZE


def demo_class_indices() -> list[int]:
    """VOC indices (1..20) of the demo's foreground classes."""
    return [VOC_CLASSES.index(name) for name in DEMO_CLASSES]


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    return ys, xs


def _background(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """(size, size, 3) float32 texture in [0, 255]."""
    ys, xs = _grid(size)
    noise = rng.normal(0.0, 1.0, (size, size, 1)).astype(np.float32)
    if kind == "grass":
        base = np.array([60, 130, 50], np.float32)
        blades = np.sin(xs * 0.9 + rng.uniform(0, 6)) * np.sin(ys * 0.15)
        return base + 25 * noise + 12 * blades[..., None]
    if kind == "sky":
        top, bottom = np.array([70, 130, 210], np.float32), np.array([170, 205, 240], np.float32)
        t = (ys / size)[..., None]
        clouds = np.clip(np.sin(xs * 0.05 + rng.uniform(0, 6)) * np.sin(ys * 0.07 + rng.uniform(0, 6)), 0, 1)
        return top * (1 - t) + bottom * t + 40 * clouds[..., None] + 4 * noise
    if kind == "wall":
        mortar = ((ys % 16) < 2) | (((xs + 16 * ((ys // 16) % 2)) % 32) < 2)
        brick = np.array([150, 80, 60], np.float32) + 10 * noise
        return np.where(mortar[..., None], np.array([190, 185, 175], np.float32), brick)
    if kind == "water":
        waves = np.sin(xs * 0.12 + 3 * np.sin(ys * 0.05) + rng.uniform(0, 6))
        return np.array([30, 90, 130], np.float32) + 20 * waves[..., None] + 6 * noise
    if kind == "road":
        base = np.array([95, 95, 100], np.float32) + 14 * noise
        lane = (np.abs(xs - size / 2) < 3) & ((ys % 40) < 22)
        return np.where(lane[..., None], np.array([230, 230, 230], np.float32), base)
    raise ValueError(f"unknown demo background {kind!r}; choose one of {', '.join(BACKGROUNDS)}")


def _pattern(kind: str, size: int, phase: float) -> np.ndarray:
    """(size, size) bool: where the marking shows its class colour."""
    ys, xs = _grid(size)
    period = 6.0
    if kind == "hstripes":
        return ((ys + phase) % period) < period / 2
    if kind == "vstripes":
        return ((xs + phase) % period) < period / 2
    if kind == "checker":
        return (((ys + phase) // 4 + (xs + phase) // 4) % 2) == 0
    if kind == "dots":
        return ((ys + phase) % period - period / 2) ** 2 + ((xs + phase) % period - period / 2) ** 2 < 4
    if kind == "diagonal":
        return ((ys + xs + phase) % period) < period / 2
    if kind == "rings":
        return (np.hypot(ys - size / 2, xs - size / 2) + phase) % period < period / 2
    raise ValueError(f"unknown marking pattern {kind!r}")


def _body(size: int, cy: float, cx: float, radius: float, rng: np.random.Generator) -> np.ndarray:
    """(size, size) bool blob: a radius modulated by a few random harmonics."""
    ys, xs = _grid(size)
    angle = np.arctan2(ys - cy, xs - cx)
    r = np.full_like(angle, radius)
    for harmonic in (2, 3, 5):
        r += radius * rng.uniform(0.04, 0.14) * np.sin(harmonic * angle + rng.uniform(0, 2 * np.pi))
    return np.hypot(ys - cy, xs - cx) < r


def render_image(rng: np.random.Generator, size: int = IMAGE_SIZE) -> tuple[np.ndarray, np.ndarray, str]:
    """One demo sample: image (H, W, 3) uint8, mask (H, W) uint8 in VOC indices, background word."""
    background = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    image = _background(background, size, rng)
    mask = np.zeros((size, size), np.uint8)
    names = list(DEMO_CLASSES)
    count = int(rng.integers(1, MAX_OBJECTS + 1))
    classes = rng.choice(len(names), size=count, replace=False)
    centres = _centres(count, size, rng)
    ys, xs = _grid(size)
    for (cy, cx), class_slot in zip(centres, classes):
        name = names[class_slot]
        colour, pattern = DEMO_CLASSES[name]
        radius = rng.uniform(*OBJECT_RADIUS) * (0.8 if count > 1 else 1.0)
        body = _body(size, cy, cx, radius, rng)
        shade = 1.0 - 0.15 * (np.hypot(ys - cy, xs - cx) / radius)[..., None]
        body_colour = np.array(BODY_COLOURS[rng.integers(len(BODY_COLOURS))], np.float32)
        image = np.where(body[..., None], body_colour * shade, image)
        # The marking: a disk somewhere inside the body, patterned in the class colour.
        offset = rng.uniform(0, radius * (1 - MARK_FRACTION) * 0.8)
        direction = rng.uniform(0, 2 * np.pi)
        my, mx = cy + offset * np.sin(direction), cx + offset * np.cos(direction)
        mark = body & (np.hypot(ys - my, xs - mx) < radius * MARK_FRACTION)
        stripes = mark & _pattern(pattern, size, rng.uniform(0, 8))
        image = np.where(stripes[..., None], np.array(colour, np.float32), image)
        mask[body] = VOC_CLASSES.index(name)
    noise = rng.normal(0.0, 3.0, image.shape)
    return np.clip(image + noise, 0, 255).astype(np.uint8), mask, background


def _centres(count: int, size: int, rng: np.random.Generator) -> list[tuple[float, float]]:
    if count == 1:
        margin = size * 0.3
        return [tuple(rng.uniform(margin, size - margin, 2))]
    # two objects side by side (left/right or top/bottom) so they rarely overlap much
    low, high = size * 0.27, size * 0.73
    jitter = rng.uniform(-size * 0.06, size * 0.06, (2, 2))
    if rng.random() < 0.5:
        points = [(size / 2, low), (size / 2, high)]
    else:
        points = [(low, size / 2), (high, size / 2)]
    return [(p[0] + j[0], p[1] + j[1]) for p, j in zip(points, jitter)]


def generator_fingerprint(seed: int = 0, samples: int = 4) -> str:
    """sha256 over the first `samples` images and masks the generator draws for `seed`.

    Compared (in the tests) against `DEMO_FINGERPRINT`, so any change to the generator's output
    forces a DEMO_VERSION bump, which in turn invalidates the committed demo encoder."""
    rng = np.random.default_rng(seed)
    digest = hashlib.sha256()
    for _ in range(samples):
        image, mask, background = render_image(rng)
        digest.update(image.tobytes() + mask.tobytes() + background.encode())
    return digest.hexdigest()


def make_demo(out: str | Path, spec: DemoSpec = DemoSpec()) -> Path:
    """Write the demo set under `out/VOCdevkit/VOC2012`; returns that folder.

    Layout: JPEGImages/*.jpg, SegmentationClassAug/*.png (palette), ImageSets/Segmentation/
    {train_aug,train,val,test}.txt, cls_labels_onehot.npy (pickled dict id → float32[20]).
    """
    root = Path(out) / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClassAug", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(spec.seed)
    palette = voc_palette()
    splits = {"train_aug": spec.train, "val": spec.val, "test": spec.test}
    labels: dict[str, np.ndarray] = {}
    backgrounds: dict[str, str] = {}
    ids_by_split: dict[str, list[str]] = {}
    for split, count in splits.items():
        ids = [f"demo_{split}_{i:05d}" for i in range(count)]
        ids_by_split[split] = ids
        for image_id in ids:
            image, mask, background = render_image(rng, spec.size)
            Image.fromarray(image).save(root / "JPEGImages" / f"{image_id}.jpg", quality=95)
            png = Image.fromarray(mask, mode="P")
            png.putpalette(palette)
            png.save(root / "SegmentationClassAug" / f"{image_id}.png")
            onehot = np.zeros(NUM_FOREGROUND, np.float32)
            present = np.unique(mask)
            onehot[present[(present > 0)] - 1] = 1.0
            labels[image_id] = onehot
            backgrounds[image_id] = background
    ids_by_split["train"] = ids_by_split["train_aug"]
    for split, ids in ids_by_split.items():
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    np.save(root / "cls_labels_onehot.npy", labels, allow_pickle=True)  # WeCLIP's format: a pickled dict
    (root / BACKGROUND_FILE).write_text(json.dumps(backgrounds))
    (root / VERSION_FILE).write_text(json.dumps({"version": DEMO_VERSION, "seed": spec.seed}))
    return root
