import pytest

from affseg.cli import main
from affseg.data.demo import TEST_IMAGES, TRAIN_IMAGES, VAL_IMAGES
from affseg.data.voc import load_cls_labels


@pytest.mark.slow
def test_make_demo_then_prepare_voc(tmp_path, capsys):
    """The default demo set through the real CLI, then prepare-voc on its output succeeds."""
    assert main(["make-demo", "--out", str(tmp_path), "--seed", "0"]) == 0
    root = tmp_path / "VOCdevkit" / "VOC2012"
    assert main(["prepare-voc", "--root", str(root)]) == 0
    out = capsys.readouterr().out
    assert f"train_aug: {TRAIN_IMAGES} ids" in out and f"val: {VAL_IMAGES} ids" in out
    assert f"test: {TEST_IMAGES} ids" in out and "problems: 0" in out
    assert len(load_cls_labels(root / "cls_labels_onehot.npy")) == TRAIN_IMAGES + VAL_IMAGES


def test_cli_missing_root_is_one_line(tmp_path, capsys):
    assert main(["prepare-voc", "--root", str(tmp_path / "absent")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("affseg prepare-voc: error:") and "dataset folder not found" in err and "\n" not in err
