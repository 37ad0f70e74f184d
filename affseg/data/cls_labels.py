"""Read WeCLIP's `cls_labels_onehot.npy` without letting the file run code.

The genuine file is `np.save` of a pickled dict id → float32[20]: an `.npy` header describing a
0-d object array, then a pickle. `np.load(allow_pickle=True)` would execute whatever globals a
crafted pickle names, so the pickle is read here by an unpickler that resolves only the four
globals that format needs and refuses every other one; the result must be one dict of str → 1-d
floating arrays.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np

NPY_MAGIC = b"\x93NUMPY"
# (module, name) pairs a numpy object-array pickle uses; numpy 1.x wrote `numpy.core`, 2.x `numpy._core`
ALLOWED_GLOBALS = {
    ("numpy._core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"): ("numpy", "ndarray"),
    ("numpy", "dtype"): ("numpy", "dtype"),
}


class LabelFileError(ValueError):
    """The labels file is not a pickled dict id → float array; the message is one line."""


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Resolves only the globals of `ALLOWED_GLOBALS`; any other global is refused before it is imported."""

    def find_class(self, module: str, name: str):
        target = ALLOWED_GLOBALS.get((module, name))
        if target is None:
            raise LabelFileError(f"refused pickle global {module}.{name} (only numpy arrays are allowed)")
        return super().find_class(*target)


def _pickle_payload(raw: bytes) -> bytes:
    """The pickle inside an `.npy` file of one object array (or the raw bytes of a plain pickle)."""
    if not raw.startswith(NPY_MAGIC):
        return raw
    stream = io.BytesIO(raw)
    version = np.lib.format.read_magic(stream)
    read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    if version not in read_header:
        raise LabelFileError(f"unsupported .npy version {version}")
    shape, _, dtype = read_header[version](stream)
    if dtype != np.dtype(object) or shape != ():
        raise LabelFileError(f"expected one pickled object, found a {dtype} array of shape {shape}")
    return raw[stream.tell():]


def _check_labels(loaded: object) -> dict[str, np.ndarray]:
    """The dict inside the 0-d object array, with every key a str and every value a 1-d float array."""
    if isinstance(loaded, np.ndarray) and loaded.dtype == object and loaded.shape == ():
        loaded = loaded.item()
    if not isinstance(loaded, dict):
        raise LabelFileError(f"expected a dict id -> float array, found {type(loaded).__name__}")
    for key, value in loaded.items():
        if not isinstance(key, str):
            raise LabelFileError(f"expected str image ids, found a {type(key).__name__} key")
        if not (isinstance(value, np.ndarray) and value.ndim == 1 and np.issubdtype(value.dtype, np.floating)):
            raise LabelFileError(f"id {key!r}: expected a 1-d float array, found {type(value).__name__}")
    return loaded


def read_label_dict(path: Path) -> dict[str, np.ndarray]:
    """id → float array from `path`; raises LabelFileError (one line, without the path) otherwise."""
    payload = _pickle_payload(path.read_bytes())
    try:
        loaded = _ArrayOnlyUnpickler(io.BytesIO(payload)).load()
    except LabelFileError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as err:
        raise LabelFileError(f"not a pickled label dict ({type(err).__name__}: {err})") from None
    return _check_labels(loaded)
