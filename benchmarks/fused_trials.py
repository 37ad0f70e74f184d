"""Fused trials (SPEC §5.4): throughput of K configurations trained on one teacher pass against K runs alone.

For each K, a fresh process builds a fused `Trainer` of K members (differing in refine.alpha and optim.lr) on
a generated demo set at 224 px crops, batch 4, and times `Trainer._step` (data, teacher, K students, K
optimiser steps; no validation) over `--iters` iterations after one untimed warm-up iteration. K runs alone
cost K × the K=1 step, so speed-up = K · t(1) / t(K). Peak memory: CUDA max allocated on a GPU, the
process's peak RSS on CPU. `--batch-heads` lists the `train.batch_heads` settings to measure for K > 1:
`never` trains the K decoders one by one, `always` as one vmap-ed call (affseg.engine.batched).

    python benchmarks/fused_trials.py [--encoder unicl_swin_tiny|unicl_swin_b] [--k 1,2,4,8] [--iters 5]
                                      [--batch-heads never,always]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from affseg.config import load_config  # noqa: E402
from affseg.data.demo import DemoSpec, make_demo  # noqa: E402
from affseg.engine.trainer import Member, Trainer  # noqa: E402

CROP = 224
BATCH = 4
ALPHAS = (1, 2, 3, 4)  # member m gets alpha ALPHAS[m % 4] and lr BASE_LR · (1 + m): all fusable keys
BASE_LR = 1e-4
WARMUP_ITERATIONS = 1  # untimed: first-call allocations and lazy initialisation


def member_configs(root: Path, out: Path, encoder: str, k: int, device: str, batch_heads: str) -> list:
    common = [f"data.root={root}", "data.demo=false", f"model.encoder={encoder}", "model.checkpoint=random",
              f"data.crop_size={CROP}", f"train.batch_size={BATCH}", "train.accumulation=1",
              "train.iterations=1000", f"train.device={device}", f"train.batch_heads={batch_heads}"]
    return [load_config(None, [*common, f"refine.alpha={ALPHAS[m % len(ALPHAS)]}", f"optim.lr={BASE_LR * (1 + m)}",
                               f"train.out_dir={out / str(m)}"]) for m in range(k)]


def measure(root: Path, encoder: str, k: int, iters: int, device: str, batch_heads: str, queue) -> None:
    """In a child process: seconds per fused iteration and peak memory (MiB) for K members."""
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))
    # vmap on CPU: PyTorch notes that its CPU attention kernel has no batching rule (the table shows the cost)
    warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet implemented")
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer.fused([Member(c) for c in member_configs(root, Path(out), encoder, k, device, batch_heads)])
        batches = iter(trainer._loader())
        cuda = trainer.runtime.device.type == "cuda"
        for _ in range(WARMUP_ITERATIONS):
            trainer._step(batches)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for _ in range(iters):
            trainer._step(batches)
        if cuda:
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / iters
        peak = (torch.cuda.max_memory_allocated() / 2**20 if cuda
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        queue.put((seconds, peak, str(trainer.runtime.device)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", default="unicl_swin_tiny", help="registry name, random weights")
    parser.add_argument("--k", default="1,2,4,8", help="comma-separated group sizes (1 is always measured)")
    parser.add_argument("--iters", type=int, default=5, help="timed iterations per K")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--batch-heads", default="never,always", help="train.batch_heads settings for K > 1")
    args = parser.parse_args()
    sizes = sorted({1, *(int(k) for k in args.k.split(","))})
    modes = args.batch_heads.split(",")
    runs = [(1, "never"), *((k, mode) for mode in modes for k in sizes if k > 1)]
    context = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        root = make_demo(Path(tmp) / "demo", DemoSpec(seed=0, train=32, val=1, test=1))
        print(f"{'K':>3} {'heads':>7} {'s/iter':>9} {'it/s member':>12} {'it/s total':>11} {'speed-up':>9} "
              f"{'peak MiB':>9}")
        per_iteration = {}
        device = "?"
        for k, mode in runs:
            queue = context.Queue()
            child = context.Process(target=measure,
                                    args=(root, args.encoder, k, args.iters, args.device, mode, queue))
            child.start()
            seconds, peak, device = queue.get()
            child.join()
            per_iteration[k, mode] = seconds
            speedup = k * per_iteration[1, "never"] / seconds
            heads = "one" if k == 1 else "vmap" if mode == "always" else "loop"
            print(f"{k:>3} {heads:>7} {seconds:>9.3f} {1 / seconds:>12.3f} {k / seconds:>11.3f} {speedup:>8.2f}x "
                  f"{peak:>9.0f}", flush=True)
    largest = sizes[-1]
    best = min(modes, key=lambda mode: per_iteration[largest, mode]) if largest > 1 else "never"
    print(f"fused speed-up at K={largest}: {largest * per_iteration[1, 'never'] / per_iteration[largest, best]:.2f}x "
          f"({args.encoder}, {device}, train.batch_heads={best})")


if __name__ == "__main__":
    main()
