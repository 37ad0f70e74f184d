"""Where and in what precision a run computes: device choice and autocast."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass

import torch

from affseg.engine.checkpoint import TrainingError


def select_device(name: str) -> torch.device:
    """`auto` → cuda when present, else cpu. Chosen once and passed down."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainingError("train.device: cuda requested but no GPU is visible; use train.device=auto or cpu")
    return torch.device(name)


def amp_dtype(device: torch.device, mode: str) -> torch.dtype | None:
    """Autocast dtype: None (fp32) on CPU or when off; bf16 where supported under `auto`."""
    if device.type != "cuda" or mode == "off":
        return None
    if mode == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[mode]


@dataclass(frozen=True)
class Runtime:
    """The device and autocast dtype of a run (None = float32)."""

    device: torch.device
    dtype: torch.dtype | None

    @classmethod
    def create(cls, device: str, amp: str) -> "Runtime":
        chosen = select_device(device)
        return cls(chosen, amp_dtype(chosen, amp))

    def autocast(self) -> AbstractContextManager:
        return nullcontext() if self.dtype is None else torch.autocast(self.device.type, dtype=self.dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """A loss scaler, active only under fp16 (bf16 and fp32 need none)."""
        return torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)


@dataclass
class RngStream:
    """One head's own torch RNG state (CPU and every CUDA device): its dropout draws are the draws a run
    of that head alone would make, whichever heads share the process."""

    cpu: torch.Tensor
    cuda: list[torch.Tensor]

    @classmethod
    def capture(cls) -> "RngStream":
        return cls(torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(self.cuda)

    @contextmanager
    def active(self) -> Iterator[None]:
        """Within: the global RNG is this stream; on exit the stream keeps what was drawn."""
        self.restore()
        try:
            yield
        finally:
            fresh = RngStream.capture()
            self.cpu, self.cuda = fresh.cpu, fresh.cuda
