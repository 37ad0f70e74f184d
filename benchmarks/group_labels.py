"""A fused group's pseudo-labels: each head's labeler on its own against `refine_together` (one PAR per PAR
setting over all heads' maps). Not a test; prints a table.

A fused `Trainer` of K members (the members of `fused_trials.py`: refine.alpha and optim.lr differ, PAR
settings equal) on a generated demo set, 224 px crops, batch 4; one teacher pass and each student's A_f,
then the K refinements (random walk, boxes, PAR, argmax) timed both ways, interleaved, median of `--repeats`
after one warm-up. Both give the same pseudo-labels bit for bit (tests/test_fused.py).

    OMP_NUM_THREADS=1 python benchmarks/group_labels.py [--k 1,2,4,8] [--repeats 3] [--device auto|cpu|cuda]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from fused_trials import member_configs  # noqa: E402  (benchmarks/fused_trials.py)
from stages import seconds  # noqa: E402  (benchmarks/stages.py)

from affseg.data.demo import DemoSpec, make_demo  # noqa: E402
from affseg.engine.trainer import Member, Trainer  # noqa: E402
from affseg.method import refine_together  # noqa: E402
from affseg.slots import max_present  # noqa: E402

ENCODER = "unicl_swin_tiny"
PAST_REFINE_START = 10**6  # an iteration at which A_f takes part


def measure(root: Path, k: int, repeats: int, device: str) -> tuple[float, float]:
    """(ms one by one, ms together) for the K heads' refinements of one micro-batch."""
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer.fused([Member(c) for c in member_configs(root, Path(out), ENCODER, k, device, "never")])
        batch = next(iter(trainer._loader()))
        on = trainer.runtime.device
        teacher = trainer.teacher(batch["image"].to(on), batch["labels"].to(on), batch["valid"].to(on),
                                  max_present(batch["labels"]))
        labelers = [head.labeler for head in trainer.heads]
        with torch.no_grad():
            aff_decs = [head.forward(teacher).aff_dec for head in trainer.heads]
        ways = {"alone": lambda: [labeler(teacher, aff, PAST_REFINE_START) for labeler, aff in zip(labelers, aff_decs)],
                "together": lambda: refine_together(labelers, teacher, aff_decs, PAST_REFINE_START)}
        times = {name: [] for name in ways}
        for run in range(1 + repeats):  # the first is the warm-up
            for name, fn in ways.items():
                took = seconds(fn, on)
                if run:
                    times[name].append(took)
        return tuple(1e3 * statistics.median(times[name]) for name in ways)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", default="1,2,4,8", help="comma-separated group sizes")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    args = parser.parse_args()
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    print(f"{ENCODER}, {device}, {torch.get_num_threads()} thread(s), batch 4, 224 px; median of {args.repeats}")
    print("| K | one by one ms | together ms | speed-up |")
    print("|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        root = make_demo(Path(tmp) / "demo", DemoSpec(seed=0, train=8, val=1, test=1))
        for k in (int(v) for v in args.k.split(",")):
            alone, together = measure(root, k, args.repeats, device)
            print(f"| {k} | {alone:.0f} | {together:.0f} | {alone / together:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
