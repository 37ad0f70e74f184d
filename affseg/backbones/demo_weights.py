"""Where encoder weights come from when `model.checkpoint` does not name a file.

`""` means the committed demo checkpoint for the tiny UniCL encoder (pre-trained offline on the
demo set by `affseg pretrain`); `"random"` means random initialisation (tests, benchmarks).
Full-size encoders have no default: they need the published file.
"""

from __future__ import annotations

import json
from pathlib import Path

ASSETS = Path(__file__).resolve().parent.parent / "assets"
DEMO_CHECKPOINTS = {"unicl_swin_tiny": ASSETS / "unicl_swin_tiny_demo.pth"}
RANDOM_WEIGHTS = "random"


class MissingWeightsError(FileNotFoundError):
    """No checkpoint given and no default exists; the message says what to pass."""


def default_checkpoint(encoder: str, checkpoint: str = "") -> str | None:
    """Resolve `model.checkpoint` to a file path, or None for random weights (ConfigError: unknown encoder)."""
    from affseg.backbones.registry import check_encoder_name

    check_encoder_name(encoder)
    if checkpoint == RANDOM_WEIGHTS:
        return None
    if checkpoint:
        return checkpoint
    if encoder in DEMO_CHECKPOINTS:
        path = DEMO_CHECKPOINTS[encoder]
        if not path.is_file():
            raise MissingWeightsError(
                f"{path}: demo encoder weights missing; rebuild them with `affseg pretrain` (see README)"
            )
        return str(path)
    raise MissingWeightsError(
        f"model.checkpoint: {encoder} needs its weights file (e.g. model.checkpoint=/path/in21k_yfcc14m_swin_base.pth)"
    )


def demo_checkpoint_record(encoder: str = "unicl_swin_tiny") -> dict:
    """The JSON written beside the demo checkpoint: command, seed, demo version, zero-shot history."""
    return json.loads(DEMO_CHECKPOINTS[encoder].with_suffix(".json").read_text())
