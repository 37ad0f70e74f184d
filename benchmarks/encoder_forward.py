"""Parameter counts and forward times of the UniCL encoders (not a test; prints a table).

Forward = ``encode_image`` under ``torch.no_grad()``, batch 1, median of 3 runs after 1 warm-up,
on CPU and, when present, CUDA. Usage: ``python benchmarks/encoder_forward.py``.
"""

from __future__ import annotations

import statistics
import time

import torch

from affseg.backbones import build_encoder

WARMUP_RUNS = 1
TIMED_RUNS = 3
CASES = [("unicl_swin_b", (224, 224)), ("unicl_swin_b", (512, 512)), ("unicl_swin_tiny", (224, 224))]


def forward_ms(encoder: torch.nn.Module, size: tuple[int, int], device: torch.device) -> float:
    """Median wall time in ms of one no-grad ``encode_image`` of a (1, 3, H, W) input."""
    images = torch.randn(1, 3, *size, device=device)
    times = []
    with torch.no_grad():
        for run in range(WARMUP_RUNS + TIMED_RUNS):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            encoder.encode_image(images)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if run >= WARMUP_RUNS:
                times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    encoders = {name: build_encoder(name) for name in dict.fromkeys(name for name, _ in CASES)}
    print(f"torch {torch.__version__}, CPU threads {torch.get_num_threads()}", end="")
    print(f", CUDA {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "")
    print()
    timings = " | ".join(f"{device.type} forward (ms)" for device in devices)
    print(f"| encoder | params | image tower params | input | {timings} |")
    print("|---|---:|---:|---|" + "---:|" * len(devices))
    for name, size in CASES:
        encoder = encoders[name]
        params = sum(p.numel() for p in encoder.parameters())
        image_params = sum(p.numel() for p in encoder.image_encoder.parameters())
        cells = []
        for device in devices:
            cells.append(f"{forward_ms(encoder.to(device), size, device):.1f}")
        encoder.to("cpu")
        print(f"| {name} | {params:,} | {image_params:,} | {size[0]}x{size[1]} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
