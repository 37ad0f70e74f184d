"""What would pruning save (SPEC §5.5)? Optuna's pruners replayed on the unpruned curves of
benchmarks/pruning_signal.py.

Training is deterministic, so a pruned trial's curve up to its pruning is exactly the unpruned curve: each
pruner (median, successive halving, Hyperband) is run on a fresh study, trial after trial in the order
they were sampled (one trial or fused group at a time, as the demo profile runs with FUSE > 1), reading
`signal` at every validation from `warmup` on. Reported: trial-iterations trained against the unpruned
sweep, and the best final val mIoU among completed trials against the unpruned best.

    python benchmarks/pruning_savings.py [--curves benchmarks/data/pruning_curves.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import optuna

from affseg.sweep.pruning import build_pruner
from affseg.sweep.space import PrunerSpec

DEFAULT_CURVES = Path(__file__).parent / "data" / "pruning_curves.json"
OBJECTIVE = "val/miou"
SIGNALS = ("val/miou", "pseudo/refined")
MIN_SAVED = 0.60  # issue 12's goal: at least 60 % of trial-iterations saved ...
MAX_LOSS = 0.5  # ... with the best within 0.5 mIoU points


def pruners(first: int) -> dict[str, PrunerSpec]:
    """The pruners compared; `first`: the first validation iteration."""
    return {
        "median": PrunerSpec(type="median", n_startup_trials=2, n_warmup_steps=0),
        "successive halving": PrunerSpec(type="successive_halving", min_resource=first, reduction_factor=3),
        "hyperband": PrunerSpec(type="hyperband", min_resource=first, reduction_factor=3),
    }


def replay(curves: list[dict], spec: PrunerSpec, signal: str, warmup: int, total: int) -> tuple[int, float]:
    """(trial-iterations trained, best final objective among completed trials) under `spec`."""
    study = optuna.create_study(direction="maximize", pruner=build_pruner(spec, max_resource=total),
                                sampler=optuna.samplers.RandomSampler(seed=0))
    trained, best = 0, float("-inf")
    for curve in curves:
        trial = study.ask()
        steps = sorted(int(k) for k in curve)
        pruned_at = None
        for step in steps:
            if step < warmup:
                continue
            trial.report(curve[str(step)][signal], step=step)
            if step < steps[-1] and trial.should_prune():
                pruned_at = step
                break
        if pruned_at is None:
            objective = max(curve[str(s)][OBJECTIVE] for s in steps)
            study.tell(trial, objective)
            trained += steps[-1]
            best = max(best, objective)
        else:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            trained += pruned_at
    return trained, best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--curves", type=Path, default=DEFAULT_CURVES)
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    curves = json.loads(args.curves.read_text())["curves"]
    steps = sorted(int(k) for k in curves[0])
    total = steps[-1]
    unpruned = len(curves) * total
    best_unpruned = max(max(c[str(s)][OBJECTIVE] for s in steps) for c in curves)
    print(f"{len(curves)} configurations x {total} iterations; unpruned best {OBJECTIVE} {100 * best_unpruned:.1f}")
    print(f"{'pruner':<20}{'signal':<16}{'from':>6}{'iterations':>12}{'saved':>8}{'best':>7}{'Δbest':>7}  goal")
    for name, spec in pruners(steps[0]).items():
        for signal in SIGNALS:
            for warmup in steps[:-1]:
                trained, best = replay(curves, spec, signal, warmup, total)
                saved = 1 - trained / unpruned
                loss = 100 * (best_unpruned - best)
                goal = "met" if saved >= MIN_SAVED and loss <= MAX_LOSS else ""
                print(f"{name:<20}{signal:<16}{warmup:>6}{trained:>12}{100 * saved:>7.1f}%{100 * best:>7.1f}"
                      f"{-loss:>7.1f}  {goal}")


if __name__ == "__main__":
    main()
