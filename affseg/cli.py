"""`affseg` command line: one entry point, thin wrappers over the library."""

from __future__ import annotations

import argparse
import os
import sys

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


def _with_preset(args: argparse.Namespace) -> list[str]:
    """The user's overrides after those of `--preset` (so the user's win)."""
    from affseg.config import preset_overrides

    return (preset_overrides(args.preset) if args.preset else []) + list(args.overrides)


def _train(args: argparse.Namespace) -> int:
    from affseg.config import dump_config, load_config, packaged_config

    overrides = _with_preset(args) + ([f"train.out_dir={args.out}"] if args.out else [])
    config = load_config(args.config or packaged_config("demo"), overrides)
    if args.print_config:
        print(dump_config(config), end="")
        return 0
    from affseg.progress import PrintProgress
    from affseg.train import train

    result = train(config, [PrintProgress(config.train.iterations)], resume_from=args.resume)
    return 0 if result.best is not None else 1


def _evaluate(args: argparse.Namespace) -> int:
    from affseg.evaluate import evaluate, format_scores, load_trained

    if args.model:
        from affseg.sweep.promote import evaluate_registered

        return evaluate_registered(args.model, split=args.split, crf=args.crf or None, export=args.export,
                                   limit=args.limit)
    trained = load_trained(args.checkpoint, encoder_checkpoint=args.encoder_checkpoint)
    scores = evaluate(trained, args.split, args.crf or None, args.export, args.limit)
    if scores is not None:
        print(format_scores(scores))
    if args.export:
        print(f"palette PNGs written to {args.export}")
    return 0


def _pretrain(args: argparse.Namespace) -> int:
    from dataclasses import fields

    from affseg.backbones.pretrain import PretrainConfig, pretrain

    config = PretrainConfig(**{f.name: getattr(args, f.name) for f in fields(PretrainConfig)})
    summary = pretrain(config)
    print(f"wrote {config.out}; final zero-shot {summary['history'][-1]}")
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from affseg.sweep.tuner import run_sweep

    summary = run_sweep(args.space, args.profile, resume=args.resume, overrides=_with_preset(args), name=args.name)
    return 0 if summary.best is not None else 1


def _promote(args: argparse.Namespace) -> int:
    from affseg.sweep.promote import promote

    uri = promote(args.sweep)
    print(f"registered {uri}; alias champion -> it. Evaluate with: make evaluate MODEL=models:/affseg@champion")
    return 0


def _report(args: argparse.Namespace) -> int:
    from affseg.sweep.analysis import sweep_report

    print("\n".join(sweep_report(args.sweep)))
    return 0


COMMANDS = {
    "sweep": _sweep,
    "report": _report,
    "promote": _promote,
    "make-demo": _make_demo,
    "prepare-voc": _prepare_voc,
    "train": _train,
    "evaluate": _evaluate,
    "pretrain": _pretrain,
}


PRESET_HELP = "config preset applied before the overrides: reference (refine exactly as WeCLIP's code does)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="affseg", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("make-demo", help="generate the offline demo dataset in VOC layout")
    demo.add_argument("--out", default="data/demo", help="output folder (VOCdevkit/VOC2012 is created inside)")
    demo.add_argument("--seed", type=int, default=0)

    voc = sub.add_parser("prepare-voc", help="build SegmentationClassAug, train_aug.txt, cls labels; check layout")
    voc.add_argument("--root", required=True, help="the VOCdevkit/VOC2012 folder")
    voc.add_argument("--sbd", default=None, help="SBD benchmark_RELEASE (or its dataset/) folder")
    tr = sub.add_parser("train", help="train UniCL-AffSeg (no --config: the demo configuration)")
    tr.add_argument("--config", default=None, help="YAML config (default: the packaged demo config)")
    tr.add_argument("--out", default=None, help="output folder (train.out_dir)")
    tr.add_argument("--resume", default=None, help="a last.pt checkpoint to continue from")
    tr.add_argument("--preset", default=None, help=PRESET_HELP)
    tr.add_argument("--print-config", action="store_true", help="print the resolved configuration as YAML and exit")
    tr.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. refine.alpha=3")

    ev = sub.add_parser("evaluate", help="multi-scale (+CRF) evaluation of a checkpoint or registered model")
    source = ev.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a training checkpoint (best.pt / last.pt)")
    source.add_argument("--model", help="a registered model URI, e.g. models:/affseg@champion")
    ev.add_argument("--encoder-checkpoint", default=None, help="override the encoder weights path")
    ev.add_argument("--split", default="val", choices=["val", "test", "train_aug"])
    ev.add_argument("--crf", action="store_true", help="dense CRF post-processing (default: eval.crf)")
    ev.add_argument("--export", default=None, help="write VOC palette PNGs here")
    ev.add_argument("--limit", type=int, default=0, help="first N images only (0 = all)")

    sw = sub.add_parser("sweep", help="Ray Tune + Optuna sweep over sweeps/<space>.yaml, tracked in MLflow")
    sw.add_argument("--space", default="refine", help="refine | loss | lr | full | stages, or a path to a space YAML")
    sw.add_argument("--profile", default="demo", help="data profile: demo | voc (sweeps/profiles/)")
    sw.add_argument("--resume", action="store_true", help="continue the interrupted sweep of this space/profile")
    sw.add_argument("--name", default=None, help="sweep name (default: derived from space and profile)")
    sw.add_argument("--preset", default=None, help=PRESET_HELP)
    sw.add_argument("overrides", nargs="*", help="config keys (train.iterations=60) or sweep settings (trials=4)")

    rp = sub.add_parser("report", help="per-class IoU of the top trials and per-class hyperparameter importance")
    rp.add_argument("--sweep", default=None, help="sweep name (default: the latest sweep), finished or running")

    pr = sub.add_parser("promote", help="register the best trial's checkpoint as model affseg, alias champion")
    pr.add_argument("--sweep", default=None, help="sweep name (default: the latest sweep)")

    from dataclasses import fields

    from affseg.backbones.pretrain import PretrainConfig

    pre = sub.add_parser("pretrain", help="contrastive UniCL pre-training of a tiny encoder on the demo set")
    helps = field_comments(PretrainConfig)
    for f in fields(PretrainConfig):
        pre.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=type(f.default), default=f.default,
                         help=f"{helps[f.name]} (default: %(default)s)")
    return parser


def field_comments(cls: type) -> dict[str, str]:
    """{field: its trailing `# comment`} of a dataclass, read from its source: the help text lives in one place."""
    import inspect
    import re

    pattern = re.compile(r"^\s+(\w+):[^#]*#\s*(.+)$")
    found = (pattern.match(line) for line in inspect.getsource(cls).splitlines())
    return {match.group(1): match.group(2).strip() for match in found if match}


def main(argv: list[str] | None = None) -> int:
    from affseg.errors import USER_ERRORS

    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except USER_ERRORS as err:
        print(f"affseg {args.command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # an unwritable or missing path met outside the checks above: name it, no traceback
        if err.filename is None:
            raise
        print(f"affseg {args.command}: error: {err.filename}: {err.strerror or type(err).__name__}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
