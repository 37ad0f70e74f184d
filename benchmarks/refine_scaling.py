"""Time refine_cams + pseudo_labels (with PAR) as the grid and the present-class count grow.

Batch 1, image = 16 × grid (stride 16), 18 encoder affinities (Swin-B stage 3),
default RefineConfig; median of 3 runs after one warm-up. Prints a table.

    OMP_NUM_THREADS=1 python benchmarks/refine_scaling.py [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import statistics

import torch
from stages import seconds  # benchmarks/stages.py

from affseg.config import RefineConfig
from affseg.data.classes import NUM_FOREGROUND
from affseg.refine.affinity import decoder_affinity, encoder_affinities
from affseg.refine.pseudo import pseudo_labels, refine_cams

STRIDE = 16
ENCODER_BLOCKS = 18
CHANNELS = 64  # token width of the synthetic blocks (affinity cost does not depend on it here)
DECODER_DIM = 256
GRIDS = (14, 21, 32)
CLASS_COUNTS = (1, 3, 6)
REPEATS = 3


def _inputs(grid: int, classes: int, device: torch.device) -> tuple:
    generator = torch.Generator().manual_seed(grid * 10 + classes)
    blocks = [torch.randn(1, CHANNELS, grid, grid, generator=generator).to(device) for _ in range(ENCODER_BLOCKS)]
    aff_enc = encoder_affinities(blocks)
    aff_dec = decoder_affinity(torch.randn(1, DECODER_DIM, grid, grid, generator=generator).to(device) / 16)
    labels = torch.zeros(1, NUM_FOREGROUND, device=device)
    labels[0, :classes] = 1
    cams = torch.rand(1, NUM_FOREGROUND, grid, grid, generator=generator).to(device) * labels[:, :, None, None]
    images = torch.randn(1, 3, grid * STRIDE, grid * STRIDE, generator=generator).to(device)
    return cams, aff_enc, aff_dec, labels, images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    device = torch.device(parser.parse_args().device)
    cfg = RefineConfig()

    print(f"device {device}, threads {torch.get_num_threads()}, median of {REPEATS} (seconds)")
    print(f"{'grid':>6} {'image':>8} {'classes':>7} {'refine_cams':>12} {'pseudo+PAR':>11} {'total':>8}")
    for grid in GRIDS:
        for classes in CLASS_COUNTS:
            cams, aff_enc, aff_dec, labels, images = _inputs(grid, classes, device)
            holder = {}

            def refine() -> None:
                holder["refined"] = refine_cams(cams, aff_enc, aff_dec, cfg)

            def label() -> None:
                pseudo_labels(holder["refined"], labels, images, cfg, use_par=True)

            refine()
            label()  # warm-up
            refine_times = [seconds(refine, device) for _ in range(REPEATS)]
            label_times = [seconds(label, device) for _ in range(REPEATS)]
            r, p = statistics.median(refine_times), statistics.median(label_times)
            size = f"{grid * STRIDE}²"
            print(f"{grid:>4}²  {size:>8} {classes:>7} {r:>12.4f} {p:>11.4f} {r + p:>8.4f}")


if __name__ == "__main__":
    main()
