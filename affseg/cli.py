"""`affseg` command line: one entry point, thin wrappers over the library."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# On 2 shared cores OpenMP busy-waiting slows torch 10-20x; set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _make_demo(args: argparse.Namespace) -> int:
    from affseg.data.demo import DemoSpec, make_demo

    root = make_demo(args.out, DemoSpec(seed=args.seed))
    print(f"demo dataset written to {root}")
    return 0


def _prepare_voc(args: argparse.Namespace) -> int:
    from affseg.data.prepare import prepare_voc

    report = prepare_voc(args.root, args.sbd)
    print("\n".join(report.lines()))
    return 1 if report.problems else 0


COMMANDS = {"make-demo": _make_demo, "prepare-voc": _prepare_voc}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="affseg", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("make-demo", help="generate the offline demo dataset in VOC layout")
    demo.add_argument("--out", default="data/demo", help="output folder (VOCdevkit/VOC2012 is created inside)")
    demo.add_argument("--seed", type=int, default=0)

    voc = sub.add_parser("prepare-voc", help="build SegmentationClassAug, train_aug.txt, cls labels; check layout")
    voc.add_argument("--root", required=True, help="the VOCdevkit/VOC2012 folder")
    voc.add_argument("--sbd", default=None, help="SBD benchmark_RELEASE (or its dataset/) folder")
    return parser


def main(argv: list[str] | None = None) -> int:
    from affseg.errors import USER_ERRORS

    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except USER_ERRORS as err:
        print(f"affseg {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
