"""Each replaced hot-path piece against the implementation it replaced (issue 13; not a test, prints a table).

The old implementations live in `tests/hot_path_reference.py`, the module the equality tests import too.
Same inputs for old and new: batch 4, background + 3 classes per image, 224² and 448² images.

| piece          | old                                           | new                                         |
|----------------|-----------------------------------------------|---------------------------------------------|
| grad_cam       | one `autograd.grad` per present-class slot    | one batched backward (`is_grads_batched`)   |
| swin_attention | softmax(QKᵀ·scale + bias + mask)·V, written out | `F.scaled_dot_product_attention`, one additive mask |
| affinities     | one matmul per block                          | one batched matmul over all blocks          |
| components     | box masks' connected components of the present maps (boolean indexing), 3×3 max propagation until `torch.equal` says stable | every map, a fixed ⌈log2(h·w)⌉ + 2 rounds of 3×3 max, hooking and shortcutting, no host read |
| par            | kernel neighbour by neighbour; 48 shifted `addcmul_` per iteration (6 dilations, 20 iterations, kernel included) | kernel from one `index_select` of every pixel's neighbours; one `F.embedding_bag` per iteration |

Time: median of `--repeats` interleaved old/new runs after one warm-up. Launches: kernels counted by the
torch profiler in one extra run (kernel launch calls on a GPU; on CPU the aten operators that do the work, i.e.
those that call no other operator). Max abs diff: new against old on the same inputs.

    OMP_NUM_THREADS=1 python benchmarks/hot_path.py [--sizes 224 448] [--repeats 5] [--device auto|cpu|cuda]
        [--pieces par ...]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from hot_path_reference import (  # noqa: E402  tests/hot_path_reference.py
    reference_cams,
    reference_component_labels,
    reference_encoder_affinities,
    reference_par,
    reference_window_attention,
)

from affseg.backbones.swin import SwinImageEncoder, window_attention  # noqa: E402
from affseg.cam import compute_cams  # noqa: E402
from affseg.config import ParConfig, RefineConfig, load_config  # noqa: E402
from affseg.data.classes import NUM_FOREGROUND  # noqa: E402
from affseg.method import build_teacher  # noqa: E402
from affseg.refine.affinity import encoder_affinities  # noqa: E402
from affseg.refine.par import par  # noqa: E402
from affseg.refine.random_walk import _active_cells, _component_labels  # noqa: E402
from stages import is_launch  # noqa: E402  (benchmarks/stages.py)

BATCH = 4
CLASSES = 3  # foreground classes per image (+ background)
GRID_STRIDE = 16
SWIN_B_STAGE3 = {"embed_dim": 512, "num_heads": 16}  # Swin-B stage 3: 512 channels, 16 heads
AFFINITY_BLOCKS = 4  # the refine space's typical n0
SEED = 0
PIECES = ("grad_cam", "swin_attention", "affinities", "components", "par")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def launches(fn: Callable[[], object], device: torch.device) -> int:
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        synchronize(device)
    return sum(1 for event in prof.events() if is_launch(event, device))


def compare(old: Callable[[], torch.Tensor], new: Callable[[], torch.Tensor], repeats: int,
            device: torch.device) -> dict:
    times = {"old": [], "new": []}
    outputs = {"old": old(), "new": new()}  # warm-up
    for _ in range(repeats):
        for name, fn in (("old", old), ("new", new)):
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    old_ms, new_ms = (1e3 * statistics.median(times[name]) for name in ("old", "new"))
    return {"old_ms": old_ms, "new_ms": new_ms, "ratio": old_ms / new_ms, "old_launches": launches(old, device),
            "new_launches": launches(new, device),
            "max_abs_diff": (outputs["new"].float() - outputs["old"].float()).abs().max().item()}


BOX_THRESHOLD = RefineConfig().box_threshold


def labels_with_classes(generator: torch.Generator) -> torch.Tensor:
    labels = torch.zeros(BATCH, NUM_FOREGROUND)
    for row in labels:
        row[torch.randperm(NUM_FOREGROUND, generator=generator)[:CLASSES]] = 1
    return labels


def pieces(size: int, device: torch.device) -> dict[str, tuple[Callable, Callable]]:
    generator = torch.Generator().manual_seed(SEED)
    images = torch.randn(BATCH, 3, size, size, generator=generator).to(device)
    labels = labels_with_classes(generator).to(device)

    config = load_config(None, ["model.encoder=unicl_swin_tiny", "model.checkpoint=random"])
    teacher = build_teacher(config, device)
    method = config.model.cam_method

    def new_cams():
        return compute_cams(teacher.encoder, teacher.classifier, teacher.encoder_input(images), labels,
                            teacher.cam_block, method)[0]

    grid = (size // GRID_STRIDE, size // GRID_STRIDE)
    swin = SwinImageEncoder(embed_dim=SWIN_B_STAGE3["embed_dim"], depths=(2,),
                            num_heads=(SWIN_B_STAGE3["num_heads"],)).to(device).eval()
    block = swin.layers[0].blocks[1]  # a shifted block: bias and mask
    layout = swin.layouts((grid[0] * 4, grid[1] * 4), device)[0][1]
    tokens = torch.randn(BATCH, *grid, SWIN_B_STAGE3["embed_dim"], generator=generator).to(device)
    blocks = [torch.randn(BATCH, SWIN_B_STAGE3["embed_dim"], *grid, generator=generator).to(device)
              for _ in range(AFFINITY_BLOCKS)]

    p = ParConfig()
    maps = torch.rand(BATCH, 1 + CLASSES, size, size, generator=generator).to(device)
    cams = torch.nn.functional.avg_pool2d(torch.rand(BATCH, NUM_FOREGROUND, *grid, generator=generator), 3, 1, 1)
    cams = (cams * labels.cpu()[:, :, None, None]).to(device)
    active = _active_cells(cams.flatten(0, 1), BOX_THRESHOLD, "inclusive")  # (B·K, h, w)
    present = labels.flatten() > 0

    def old_components():  # the present maps only (boolean indexing), propagated until stable
        out = torch.zeros(active.shape, dtype=torch.long, device=device)
        out[present] = reference_component_labels(active[present])
        return out

    return {
        "grad_cam": (lambda: reference_cams(teacher, images, labels, method), new_cams),
        "swin_attention": (lambda: _no_grad(reference_window_attention, block, tokens, layout),
                           lambda: _no_grad(window_attention, block, tokens, layout)),
        "affinities": (lambda: reference_encoder_affinities(blocks), lambda: encoder_affinities(blocks)),
        "components": (old_components, lambda: _component_labels(active)[0]),
        "par": (lambda: reference_par(images, maps, p.dilations, p.iterations, p.w1, p.w2),
                lambda: par(images, maps, p.dilations, p.iterations, p.w1, p.w2)),
    }


def _no_grad(fn: Callable, *args) -> torch.Tensor:
    with torch.no_grad():
        return fn(*args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 448])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--pieces", nargs="+", choices=PIECES, default=list(PIECES), help="the pieces to time")
    args = parser.parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    torch.manual_seed(SEED)
    print(f"device {device}, {torch.get_num_threads()} thread(s), batch {BATCH}, background + {CLASSES} classes")
    print("| piece | size | old ms | new ms | time ratio | launches old → new | max abs diff |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    par_rows = []
    for size in args.sizes:
        for name, (old, new) in pieces(size, device).items():
            if name not in args.pieces:
                continue
            row = compare(old, new, args.repeats, device)
            print(f"| {name} | {size} | {row['old_ms']:.1f} | {row['new_ms']:.1f} | {row['ratio']:.2f}x | "
                  f"{row['old_launches']} → {row['new_launches']} | {row['max_abs_diff']:.1e} |", flush=True)
            if name == "par":
                par_rows.append(row)
    if not par_rows:
        return
    last = par_rows[-1]
    print(f"PAR launches: {last['old_launches']} -> {last['new_launches']} "
          f"({last['old_launches'] / last['new_launches']:.1f}x fewer), time {last['ratio']:.2f}x")


if __name__ == "__main__":
    main()
