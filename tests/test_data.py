import numpy as np
import pytest
import torch
from PIL import Image

from affseg.data.classes import IGNORE_INDEX, NUM_FOREGROUND
from affseg.data.demo import DEMO_CLASSES, IMAGE_SIZE, demo_class_indices, render_image
from affseg.data.transforms import TrainAugment
from affseg.data.voc import DatasetError, VocSegmentation, labels_from_mask, read_mask


def test_demo_eval_items(small_demo):
    dataset = VocSegmentation(small_demo, "val")
    assert len(dataset) == 8
    allowed = {0, *demo_class_indices()}
    for index in range(len(dataset)):
        item = dataset[index]
        assert item["image"].shape == (3, IMAGE_SIZE, IMAGE_SIZE) and item["image"].dtype == torch.float32
        assert item["mask"].shape == (IMAGE_SIZE, IMAGE_SIZE) and item["mask"].dtype == torch.int64
        present = set(item["mask"].unique().tolist())
        assert present <= allowed and len(present) >= 2  # background + at least one object
        # image-level labels are exactly the mask's foreground classes
        expected = torch.zeros(NUM_FOREGROUND)
        expected[[c - 1 for c in present if c > 0]] = 1
        assert torch.equal(item["labels"], expected)


def test_train_augment_shapes_and_padding(small_demo):
    crop = 2 * IMAGE_SIZE // 3
    augment = TrainAugment(crop_size=crop, scale_min=0.5, scale_max=0.5)  # the image shrinks to half: padding
    dataset = VocSegmentation(small_demo, "train_aug", augment=augment, seed=1)
    item = dataset[0]
    assert item["image"].shape == (3, crop, crop) and item["mask"].shape == (crop, crop)
    padded = item["mask"] == IGNORE_INDEX
    expected = 1 - (IMAGE_SIZE / 2) ** 2 / crop**2  # (2/3)² vs (1/2)² of the side: 44 % padding
    assert abs(padded.float().mean() - expected) < 0.02
    assert torch.allclose(item["image"][:, padded], torch.zeros(1), atol=1e-5)  # padded with the mean
    again = VocSegmentation(small_demo, "train_aug", augment=augment, seed=1)[0]
    assert torch.equal(item["image"], again["image"])  # deterministic per (seed, epoch, index)


def test_demo_is_deterministic_per_seed():
    a = render_image(np.random.default_rng(5))
    b = render_image(np.random.default_rng(5))
    c = render_image(np.random.default_rng(6))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_demo_masks_are_palette_pngs(small_demo):
    path = next((small_demo / "SegmentationClassAug").glob("*.png"))
    assert Image.open(path).mode == "P"
    assert read_mask(path).max() <= max(demo_class_indices())
    assert len(DEMO_CLASSES) >= 4


def test_corrupt_image_is_skipped_not_fatal(small_demo, tmp_path):
    import shutil

    root = tmp_path / "VOC2012"
    shutil.copytree(small_demo, root)
    first = (root / "ImageSets/Segmentation/val.txt").read_text().split()[0]
    (root / "JPEGImages" / f"{first}.jpg").write_bytes(b"not a jpeg")
    dataset = VocSegmentation(root, "val")
    item = dataset[0]
    assert item["id"] != first and first in dataset.bad_ids


def test_missing_dataset_message(tmp_path):
    with pytest.raises(DatasetError, match="dataset folder not found"):
        VocSegmentation(tmp_path / "nope", "val")


def test_labels_from_mask_ignores_void():
    mask = np.array([[0, 255], [3, 15]], np.uint8)
    labels = labels_from_mask(mask)
    assert labels.sum() == 2 and labels[2] == 1 and labels[14] == 1
