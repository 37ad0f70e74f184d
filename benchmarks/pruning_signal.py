"""Which signal should the pruner read (SPEC §5.5)? Rank agreement of each validation's signals with the final
val mIoU, over seeded configurations of a sweep space trained unpruned on the demo set.

Configurations are drawn by Optuna's seeded random sampler from the space (conditional parameters as in a
sweep) and trained on the demo profile's schedule, `--fuse` at a time on one teacher pass (each member equals
its run alone, tests/test_fused.py). Every validation's val mIoU, pseudo/refined and pseudo/cam_par is saved
to `--out` (the input of benchmarks/pruning_savings.py), then the table prints, per validation iteration and
signal, the Spearman correlation with the final val mIoU.

    python benchmarks/pruning_signal.py [--space refine] [--configs 16] [--fuse 4] [--out benchmarks/data/pruning_curves.json]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import optuna  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402

from affseg.callbacks import Callback  # noqa: E402
from affseg.engine.trainer import Member  # noqa: E402
from affseg.sweep.space import load_space  # noqa: E402
from affseg.train import train_fused  # noqa: E402

SIGNALS = ("val/miou", "pseudo/refined", "pseudo/cam_par")
DEFAULT_OUT = Path(__file__).parent / "data" / "pruning_curves.json"


class _Curve(Callback):
    """Each validation's signals, by iteration."""

    def __init__(self):
        self.points: dict[int, dict[str, float]] = {}

    def on_validation(self, result, checkpoint, is_best):
        metrics = result.metrics()
        self.points[result.iteration] = {signal: metrics[signal] for signal in SIGNALS}


def sample_configs(space: str, count: int, seed: int) -> tuple[object, list[dict]]:
    spec = load_space(space, "demo")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    return spec, [spec.sample(study.ask()) for _ in range(count)]


def train_curves(spec, params: list[dict], fuse: int) -> list[dict]:
    """Unpruned curves {iteration: {signal: value}} of every configuration, `fuse` configurations per group."""
    curves = []
    with tempfile.TemporaryDirectory() as out:
        for start in range(0, len(params), fuse):
            group = params[start : start + fuse]
            recorders = [_Curve() for _ in group]
            members = [Member(spec.trial_config(p, {"train.out_dir": str(Path(out) / str(start + i))}), [recorder])
                       for i, (p, recorder) in enumerate(zip(group, recorders))]
            train_fused(members)
            curves += [{str(k): v for k, v in r.points.items()} for r in recorders]
            print(f"trained {start + len(group)}/{len(params)} configurations", flush=True)
    return curves


def agreement_table(curves: list[dict]) -> list[str]:
    iterations = sorted({int(k) for curve in curves for k in curve})
    final = [curve[str(iterations[-1])]["val/miou"] for curve in curves]
    lines = [f"{'iteration':>9}" + "".join(f"{s:>16}" for s in SIGNALS) + "   Spearman ρ with the final val/miou"]
    for iteration in iterations:
        row = [spearmanr([c[str(iteration)][s] for c in curves], final).statistic for s in SIGNALS]
        lines.append(f"{iteration:>9}" + "".join(f"{value:>16.2f}" for value in row))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space", default="refine")
    parser.add_argument("--configs", type=int, default=16)
    parser.add_argument("--fuse", type=int, default=4, help="configurations trained together (1 = one by one)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec, params = sample_configs(args.space, args.configs, args.seed)
    curves = train_curves(spec, params, args.fuse)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"space": args.space, "params": params, "curves": curves}, indent=1) + "\n")
    print("\n".join(agreement_table(curves)))
    print(f"curves saved to {args.out}")


if __name__ == "__main__":
    main()
