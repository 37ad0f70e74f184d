import shutil

import numpy as np
import pytest
from PIL import Image

from affseg.cli import main
from affseg.data.demo import IMAGE_SIZE
from affseg.data.voc import load_cls_labels, read_mask


@pytest.fixture
def voc_tree(small_demo, tmp_path):
    """A VOC-like tree from the demo set: VOC's own masks in SegmentationClass, no Aug yet."""
    root = tmp_path / "VOCdevkit" / "VOC2012"
    shutil.copytree(small_demo, root)
    (root / "SegmentationClassAug").rename(root / "SegmentationClass")
    (root / "cls_labels_onehot.npy").unlink()
    return root


def test_prepare_reports_corrupt_and_missing(voc_tree, capsys):
    val_ids = (voc_tree / "ImageSets/Segmentation/val.txt").read_text().split()
    corrupt, unmasked = val_ids[0], val_ids[1]
    (voc_tree / "JPEGImages" / f"{corrupt}.jpg").write_bytes(b"\x00garbage")
    (voc_tree / "SegmentationClass" / f"{unmasked}.png").unlink()
    assert main(["prepare-voc", "--root", str(voc_tree)]) == 1
    out = capsys.readouterr().out
    assert f"{corrupt}.jpg: unreadable image" in out
    assert f"{unmasked}.png: mask missing" in out
    labels = load_cls_labels(voc_tree / "cls_labels_onehot.npy")
    assert corrupt not in labels and unmasked not in labels
    good = val_ids[2]
    mask = read_mask(voc_tree / "SegmentationClassAug" / f"{good}.png")
    expected = np.zeros(20, np.float32)
    expected[[c - 1 for c in np.unique(mask) if 0 < c < 255]] = 1
    assert np.array_equal(labels[good], expected)


def test_sbd_conversion_and_train_aug_rule(voc_tree, tmp_path):
    from scipy.io import savemat

    split_dir = voc_tree / "ImageSets/Segmentation"
    train = split_dir.joinpath("train_aug.txt").read_text().split()
    val = split_dir.joinpath("val.txt").read_text().split()
    split_dir.joinpath("train.txt").write_text("\n".join(train[:10]) + "\n")
    split_dir.joinpath("train_aug.txt").unlink()
    # SBD holds masks for 10 more train ids (their VOC masks removed) and one VOC val id
    sbd = tmp_path / "benchmark_RELEASE" / "dataset"
    (sbd / "cls").mkdir(parents=True)
    sbd_ids = train[10:20] + [val[0]]
    for image_id in sbd_ids:
        own = voc_tree / "SegmentationClass" / f"{image_id}.png"
        mask = np.asarray(Image.open(own))
        if image_id in train:
            own.unlink()
        mask = mask.copy()
        if image_id == val[0]:
            mask[:] = 7  # differs from VOC's own mask, which must win
        savemat(sbd / "cls" / f"{image_id}.mat", {"GTcls": {"Segmentation": mask}})
    (sbd / "train.txt").write_text("\n".join(sbd_ids[:6]) + "\n")
    (sbd / "val.txt").write_text("\n".join(sbd_ids[6:]) + "\n")
    assert main(["prepare-voc", "--root", str(voc_tree), "--sbd", str(sbd.parent)]) == 0
    train_aug = split_dir.joinpath("train_aug.txt").read_text().split()
    assert sorted(train_aug) == sorted(train[:20])  # (SBD train ∪ SBD val ∪ VOC train) − VOC val
    converted = read_mask(voc_tree / "SegmentationClassAug" / f"{train[12]}.png")
    assert converted.shape == (IMAGE_SIZE, IMAGE_SIZE) and converted.max() > 0
    kept = read_mask(voc_tree / "SegmentationClassAug" / f"{val[0]}.png")
    assert not (kept == 7).all()  # VOC's own mask won
