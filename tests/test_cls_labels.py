"""cls_labels_onehot.npy is read without running code (issue 9, item 1)."""

import io
import os
import pickle

import numpy as np
import pytest

from affseg.data.cls_labels import NPY_MAGIC, LabelFileError, read_label_dict
from affseg.data.voc import DatasetError, load_cls_labels

GENUINE = {"2007_000032": np.eye(20, dtype=np.float32)[0], "2007_000039": np.eye(20, dtype=np.float32)[19]}


class Payload:
    """Unpickling this calls os.system, the classic crafted-pickle attack."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def save_npy(path, obj):
    np.save(path, np.array(obj, dtype=object) if not isinstance(obj, np.ndarray) else obj, allow_pickle=True)


def test_genuine_file_loads(tmp_path):
    path = tmp_path / "cls_labels_onehot.npy"
    np.save(path, GENUINE, allow_pickle=True)  # exactly what prepare-voc and make-demo write
    labels = load_cls_labels(path)
    assert sorted(labels) == sorted(GENUINE)
    for key, value in GENUINE.items():
        assert labels[key].dtype == np.float32 and np.array_equal(labels[key], value)


def test_numpy1_file_loads(tmp_path):
    # numpy 1.x names the reconstructor numpy.core.multiarray; protocol 3 writes globals as text lines
    old_pickle = pickle.dumps(GENUINE, protocol=3)
    assert b"numpy._core.multiarray\n_reconstruct" in old_pickle
    old_pickle = old_pickle.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
    buffer = io.BytesIO()
    np.save(buffer, GENUINE, allow_pickle=True)
    header = buffer.getvalue()[: buffer.getvalue().index(b"\n") + 1]
    path = tmp_path / "old.npy"
    path.write_bytes(header + old_pickle)
    assert sorted(load_cls_labels(path)) == sorted(GENUINE)


def test_plain_pickle_loads(tmp_path):
    path = tmp_path / "labels.pkl"
    path.write_bytes(pickle.dumps(GENUINE))
    assert sorted(read_label_dict(path)) == sorted(GENUINE)


@pytest.mark.parametrize("as_npy", [True, False])
def test_crafted_pickle_is_refused_and_never_runs(tmp_path, as_npy):
    marker = tmp_path / "pwned"
    path = tmp_path / "cls_labels_onehot.npy"
    crafted = {"2007_000032": Payload(marker)}
    if as_npy:
        save_npy(path, crafted)
        assert path.read_bytes().startswith(NPY_MAGIC)
    else:
        path.write_bytes(pickle.dumps(crafted))
    with pytest.raises(DatasetError) as error:
        load_cls_labels(path)
    message = str(error.value)
    assert "\n" not in message and str(path) in message and "refused pickle global" in message
    assert not marker.exists()


@pytest.mark.parametrize("content", [["2007_000032"], {"2007_000032": "dog"}, {7: np.zeros(20, np.float32)},
                                     {"2007_000032": np.zeros(20, np.int64)}])
def test_wrong_content_is_refused(tmp_path, content):
    path = tmp_path / "cls_labels_onehot.npy"
    save_npy(path, content)
    with pytest.raises(DatasetError, match="cls_labels_onehot.npy: unusable image-level labels"):
        load_cls_labels(path)


def test_numeric_npy_and_garbage_are_refused(tmp_path):
    numeric = tmp_path / "numeric.npy"
    np.save(numeric, np.zeros((2, 20), np.float32))
    with pytest.raises(LabelFileError, match="expected one pickled object"):
        read_label_dict(numeric)
    garbage = tmp_path / "garbage.npy"
    garbage.write_bytes(b"\x80\x04not a pickle at all")
    with pytest.raises(DatasetError, match="garbage.npy"):
        load_cls_labels(garbage)
