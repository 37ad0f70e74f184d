"""Reading and writing encoder checkpoints: safe unpickling, the published UniCL layout, OpenAI CLIP files.

- ``safe_load``: ``torch.load`` through a restricted unpickler. Tensors, numpy arrays/scalars and
  plain containers are rebuilt; any other global (e.g. the yacs ``CfgNode`` UniCL stores under ``'config'``) becomes an
  inert :class:`Unpickled` placeholder: its module is never imported and nothing of it is called.
- ``load_unicl`` / ``save_unicl``: the file layout of microsoft/UniCL (``{'model': state_dict, ...}``,
  keys under ``image_encoder.`` / ``text_encoder.`` plus ``image_projection``, ``text_projection``,
  ``logit_scale``) to and from ``UniCLEncoder``. Loading is strict about parameters; the Swin buffers
  (``relative_position_index``, ``attn_mask``) are optional on load (recomputed for every input size)
  and written on save, as the published file has them.
- ``load_openai_clip``: an OpenAI CLIP TorchScript archive through ``open_clip.load_openai_model``.

Every failure is a :class:`CheckpointError` with a one-line message naming the file.
"""

from __future__ import annotations

import codecs
import os
import pickle
import re
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import numpy._core.multiarray as numpy_multiarray
import torch
from open_clip import load_openai_model
from torch import Tensor

from affseg.backbones.clip_vit import ClipConfig, ClipVitEncoder, build_clip
from affseg.backbones.swin import BUILD_SIZE, WINDOW_SIZE, relative_position_index
from affseg.backbones.unicl import UNICL_CONFIGS, UniCLEncoder

MODEL_KEY = "model"  # UniCL's save_checkpoint puts the state dict here
DATA_PARALLEL_PREFIX = "module."
MAX_LISTED = 5  # keys listed per kind of mismatch in an error message
UNICL_HINT = (
    "hint: wrong file, or wrong encoder name: the UniCL Swin-B weights are in21k_yfcc14m_swin_base.pth "
    f"(encoder 'unicl_swin_b'); encoders: {', '.join(UNICL_CONFIGS)}"
)
CLIP_HINT = "hint: wrong file, or wrong encoder name: ViT-B/16 is OpenAI's ViT-B-16.pt (encoder 'clip_vit_b16')"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read or does not fit the encoder; the message is one line."""


# --------------------------------------------------------------------------- restricted unpickling


class Unpickled(dict):
    """Inert stand-in for a global the restricted unpickler refused to import.

    The class records what the pickle asked for (``module``, ``qualname``); an instance keeps what the
    pickle fed it: constructor ``args``, ``state``, dict items (in the dict itself), ``appended`` items.
    """

    module = ""
    qualname = ""
    args: tuple = ()
    state: Any = None

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__()
        self.args = args + tuple(kwargs.items())

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def append(self, item: Any) -> None:
        self.__dict__.setdefault("appended", []).append(item)

    def extend(self, items: Any) -> None:
        self.__dict__.setdefault("appended", []).extend(items)

    def __repr__(self) -> str:
        return f"<unpickled {self.module}.{self.qualname}>"


_NUMPY_MULTIARRAY = ("numpy._core.multiarray", "numpy.core.multiarray")  # numpy 2 / numpy 1 module names
_PLACEHOLDERS: dict[tuple[str, str], type[Unpickled]] = {}


def _placeholder(module: str, qualname: str) -> type[Unpickled]:
    key = (module, qualname)
    if key not in _PLACEHOLDERS:
        attributes = {"module": module, "qualname": qualname}
        _PLACEHOLDERS[key] = type(f"Unpickled[{module}.{qualname}]", (Unpickled,), attributes)
    return _PLACEHOLDERS[key]


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): OrderedDict,
    ("_codecs", "encode"): codecs.encode,  # bytes in protocol-2 pickles
    ("numpy", "dtype"): np.dtype,
    ("numpy", "ndarray"): np.ndarray,
    **{(module, "scalar"): numpy_multiarray.scalar for module in _NUMPY_MULTIARRAY},
    **{(module, "_reconstruct"): numpy_multiarray._reconstruct for module in _NUMPY_MULTIARRAY},
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch", "Size"): torch.Size,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "complex"): complex,
    ("builtins", "slice"): slice,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only tensors, numpy arrays, dtypes and plain containers; any other global becomes a placeholder."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[(module, name)]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        return _placeholder(module, name)


# torch.load wants a pickle-module-like object: ``Unpickler`` (zip files) and ``load`` (legacy files).
RESTRICTED_PICKLE = SimpleNamespace(
    __name__="affseg_restricted_pickle",
    Unpickler=_RestrictedUnpickler,
    load=lambda file, **kwargs: _RestrictedUnpickler(file, **kwargs).load(),
)


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def safe_load(path: str | os.PathLike) -> Any:
    """``torch.load`` a file on CPU without executing or importing anything but tensor rebuilding."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        return torch.load(path, map_location="cpu", pickle_module=RESTRICTED_PICKLE, weights_only=False)
    except Exception as error:  # any read failure is reported the same way, in one line
        raise CheckpointError(
            f"{path}: cannot read checkpoint ({_one_line(error)}); the file is truncated or not a PyTorch "
            "checkpoint: download or write it again"
        ) from error


def _format_shape(value: Any) -> str:
    if not isinstance(value, Tensor):
        return type(value).__name__
    return "(" + ", ".join(str(size) for size in value.shape) + ")"


def check_state_dict(
    path: str | os.PathLike,
    found: Mapping[str, Any],
    expected: Mapping[str, Tensor],
    optional: Mapping[str, Tensor] | None = None,
    hint: str = "",
) -> None:
    """Raise ``CheckpointError`` unless ``found`` has exactly the keys and shapes of ``expected``.

    ``optional`` keys may be present (any shape) or absent. The message lists the first
    ``MAX_LISTED`` missing keys, unexpected keys and shape mismatches (``key: file (..) vs model (..)``).
    """
    optional = optional or {}
    missing = [key for key in expected if key not in found]
    unexpected = [key for key in found if key not in expected and key not in optional]
    mismatched = [
        f"{key}: file {_format_shape(found[key])} vs model {_format_shape(expected[key])}"
        for key in expected
        if key in found and (not isinstance(found[key], Tensor) or found[key].shape != expected[key].shape)
    ]
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatches", mismatched)):
        if items:
            shown = ", ".join(items[:MAX_LISTED]) + (", ..." if len(items) > MAX_LISTED else "")
            problems.append(f"{len(items)} {label} [{shown}]")
    if problems:
        raise CheckpointError(f"{path}: checkpoint does not fit the encoder: {'; '.join(problems)}; {hint}")


# --------------------------------------------------------------------------- UniCL published layout

_SWIN_BUFFER = re.compile(r"^image_encoder\.layers\.\d+\.blocks\.\d+\.(attn\.relative_position_index|attn_mask)$")
_DOWNSAMPLE = re.compile(r"^image_encoder\.layers\.(\d+)\.downsample\.")
_OURS_TEXT_BLOCKS = "text_encoder.transformer.resblocks."
_PUBLISHED_TEXT_BLOCKS = "text_encoder.resblocks."
_OURS_TEXT_PROJECTION = "text_encoder.text_projection"
_PUBLISHED_TEXT_PROJECTION = "text_projection"


def _shift_downsample(key: str, offset: int) -> str:
    """timm merges patches at the start of stage i+1, UniCL (original Swin) at the end of stage i."""
    return _DOWNSAMPLE.sub(lambda match: f"image_encoder.layers.{int(match.group(1)) + offset}.downsample.", key)


def to_published_key(key: str) -> str:
    """Our (timm / open_clip) state-dict key -> the key in UniCL's published checkpoint."""
    if key == _OURS_TEXT_PROJECTION:
        return _PUBLISHED_TEXT_PROJECTION
    if key.startswith(_OURS_TEXT_BLOCKS):
        return _PUBLISHED_TEXT_BLOCKS + key[len(_OURS_TEXT_BLOCKS) :]
    return _shift_downsample(key, -1)


def from_published_key(key: str) -> str:
    """Inverse of ``to_published_key``."""
    if key == _PUBLISHED_TEXT_PROJECTION:
        return _OURS_TEXT_PROJECTION
    if key.startswith(_PUBLISHED_TEXT_BLOCKS):
        return _OURS_TEXT_BLOCKS + key[len(_PUBLISHED_TEXT_BLOCKS) :]
    return _shift_downsample(key, +1)


def swin_buffers(encoder: UniCLEncoder) -> dict[str, Tensor]:
    """The persistent buffers of the original Swin built at 224: relative position index in every
    block ``(49, 49)`` int64, shifted-window mask ``(num_windows, 49, 49)`` in shifted blocks whose map
    is larger than the window."""
    index = relative_position_index((WINDOW_SIZE, WINDOW_SIZE))
    plan = encoder.image_encoder.layouts((BUILD_SIZE, BUILD_SIZE), torch.device("cpu"))
    buffers = {}
    for stage, layouts in enumerate(plan):
        for block, layout in enumerate(layouts):
            prefix = f"image_encoder.layers.{stage}.blocks.{block}."
            buffers[prefix + "attn.relative_position_index"] = index.clone()
            if layout.mask is not None:
                buffers[prefix + "attn_mask"] = layout.mask.clone()
    return buffers


def published_state_dict(encoder: UniCLEncoder) -> dict[str, Tensor]:
    """``encoder``'s weights in the published UniCL layout, buffers included, sorted by key."""
    state = {to_published_key(key): value.detach() for key, value in encoder.state_dict().items()}
    state.update(swin_buffers(encoder))
    return dict(sorted(state.items()))


def _unwrap(path: Path, loaded: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state dict with any ``module.`` prefix stripped, the other entries of the container)."""
    if isinstance(loaded, Mapping) and isinstance(loaded.get(MODEL_KEY), Mapping):
        state, extra = loaded[MODEL_KEY], {key: value for key, value in loaded.items() if key != MODEL_KEY}
    elif isinstance(loaded, Mapping) and loaded and all(isinstance(value, Tensor) for value in loaded.values()):
        state, extra = loaded, {}
    else:
        raise CheckpointError(
            f"{path}: no state dict found: expected {{'{MODEL_KEY}': state_dict, ...}} or a bare state dict"
        )
    state = {key.removeprefix(DATA_PARALLEL_PREFIX): value for key, value in state.items()}
    return state, dict(extra)


def load_unicl(path: str | os.PathLike, encoder: UniCLEncoder) -> dict[str, Any]:
    """Load a published-layout UniCL checkpoint into ``encoder`` strictly (fp16 files are cast to fp32).

    Returns:
        The container's other entries (e.g. ``config``, ``epoch``, or the ``extra`` of ``save_unicl``);
        objects of classes outside plain containers come back as ``Unpickled`` placeholders.
    """
    path = Path(path)
    state, extra = _unwrap(path, safe_load(path))
    expected = published_state_dict(encoder)
    buffers = {key: value for key, value in expected.items() if _SWIN_BUFFER.match(key)}
    parameters = {key: value for key, value in expected.items() if key not in buffers}
    hint = f"{UNICL_HINT} (checked against '{encoder.config.name}')"
    check_state_dict(path, state, parameters, optional=buffers, hint=hint)
    ours = {from_published_key(key): value for key, value in state.items() if key not in buffers}
    encoder.load_state_dict(ours, strict=True)
    return extra


def save_unicl(
    encoder: UniCLEncoder,
    path: str | os.PathLike,
    extra: dict[str, Any] | None = None,
    half: bool = False,
) -> None:
    """Write ``{'model': published-layout state dict, **extra}``; ``half`` stores floats as fp16."""
    extra = dict(extra or {})
    if MODEL_KEY in extra:
        raise ValueError(f"extra must not contain the key '{MODEL_KEY}'")
    state = published_state_dict(encoder)
    if half:
        state = {key: value.half() if value.is_floating_point() else value for key, value in state.items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    torch.save({MODEL_KEY: state, **extra}, partial)
    os.replace(partial, path)


# --------------------------------------------------------------------------- OpenAI CLIP


# Non-tensor entries of OpenAI's state dicts that open_clip reads and drops (they are not model weights).
OPENAI_EXTRAS = {"input_resolution": None, "context_length": None, "vocab_size": None}


def load_openai_clip(path: str | os.PathLike, config: ClipConfig) -> ClipVitEncoder:
    """Load an OpenAI CLIP file (TorchScript archive or state dict) with ``open_clip.load_openai_model``
    (fp32, CPU, QuickGELU) and check that it has exactly ``config``'s architecture."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    with torch.device("meta"):
        reference = build_clip(config)
    hint = f"{CLIP_HINT} (checked against '{config.name}')"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated; OpenAI's files are TorchScript
            model = load_openai_model(str(path), precision="fp32", device="cpu")
    except Exception as error:  # open_clip raises RuntimeError / KeyError / pickle errors
        # A plain state dict that open_clip cannot build from (a key it reads the shapes from is missing):
        # name what is off instead of open_clip's own KeyError.
        try:
            found = safe_load(path)
        except CheckpointError:
            found = None
        if isinstance(found, Mapping):
            check_state_dict(path, found, reference.state_dict(), optional=OPENAI_EXTRAS, hint=hint)
        message = f"{path}: cannot load as an OpenAI CLIP file ({_one_line(error)}); {CLIP_HINT}"
        raise CheckpointError(message) from error
    check_state_dict(path, model.state_dict(), reference.state_dict(), hint=hint)
    return ClipVitEncoder(config, model=model)
