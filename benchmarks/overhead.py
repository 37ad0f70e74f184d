"""Platform overhead: the same configuration trained alone and as a one-trial sweep (Ray Tune + Optuna +
MLflow), per iteration and per validation, with start-up reported apart.

The configuration is the demo profile's default refine trial (its log interval: the sweep logs to MLflow
as often as a real one); the sweep's space has one choice, the default alpha, so both runs train exactly
the same thing, and the one trial holds all the machine's CPUs, as the run alone does. A timing callback
stamps every logged iteration: an iteration's time is the gap to the previous stamp over the iterations
between them, when no validation ran in between; a validation's cost is what a gap with one costs more.
Start-up: from the call to the first iteration. On a shared machine single runs vary by ±30 %, so the two
are interleaved `--repeats` times and the fastest of each is reported.

    python benchmarks/overhead.py [--iterations 48] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from affseg.callbacks import Callback  # noqa: E402

STAMPS_ENV = "AFFSEG_OVERHEAD_STAMPS"  # where the timed training writes its stamps (JSON)
SPACE = "parameters:\n  refine.alpha: {type: categorical, choices: [2]}\nmetric: val/miou\nmode: max\n"


class Stamps(Callback):
    """Wall-clock stamps of the call, every iteration and every validation, written to a JSON file."""

    def __init__(self, path: Path, started: float):
        self.path, self.started = path, started
        self.iterations: dict[int, float] = {}
        self.validations: list[int] = []

    def on_log(self, iteration, values):
        self.iterations[iteration] = time.time()

    def on_validation(self, result, checkpoint, is_best):
        self.validations.append(result.iteration)

    def on_end(self, result):
        self.path.write_text(json.dumps({"started": self.started, "iterations": self.iterations,
                                         "validations": self.validations}))


def timed_train(config, callbacks=(), resume_from=None):
    """`affseg.train.train` with a `Stamps` callback (a sweep's `train_fn`)."""
    from affseg.train import train

    started = float(os.environ.get("AFFSEG_OVERHEAD_T0", time.time()))
    return train(config, [*callbacks, Stamps(Path(os.environ[STAMPS_ENV]), started)], resume_from)


def summarise(stamps: dict) -> dict[str, float]:
    times = {int(k): v for k, v in stamps["iterations"].items()}
    validated = set(stamps["validations"])
    steps = sorted(times)
    gaps = list(zip(steps, steps[1:]))
    plain = [(times[b] - times[a]) / (b - a) for a, b in gaps if not validated & set(range(a, b))]
    per_iteration = statistics.median(plain)
    after = [times[b] - times[a] - (b - a) * per_iteration for a, b in gaps if validated & set(range(a, b))]
    return {"startup_s": times[steps[0]] - stamps["started"], "iteration_s": per_iteration,
            "validation_s": statistics.mean(after) if after else float("nan")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=2, help="interleaved alone/sweep pairs; the fastest counts")
    args = parser.parse_args()
    cpus = os.cpu_count() or 1
    schedule = [f"train.iterations={args.iterations}", "trials=1", "concurrency=1", f"cpus_per_trial={cpus}"]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        os.chdir(work)
        (work / "space.yaml").write_text(SPACE)
        from affseg.sweep.space import load_space
        from affseg.sweep.tuner import run_sweep

        config = load_space(str(work / "space.yaml"), "demo", schedule).trial_config({"refine.alpha": 2},
                                                                                   {"train.out_dir": str(work / "a")})
        alones, sweeps = [], []
        for repeat in range(args.repeats):
            os.environ[STAMPS_ENV] = str(work / "alone.json")
            os.environ["AFFSEG_OVERHEAD_T0"] = str(time.time())
            timed_train(config)
            alones.append(summarise(json.loads((work / "alone.json").read_text())))
            os.environ[STAMPS_ENV] = str(work / "sweep.json")
            os.environ["AFFSEG_OVERHEAD_T0"] = str(time.time())
            run_sweep(str(work / "space.yaml"), "demo", overrides=schedule, train_fn=timed_train,
                      name=f"overhead-{repeat}")
            sweeps.append(summarise(json.loads((work / "sweep.json").read_text())))
        # per iteration and validation: the fastest run; start-up: the first (cold) one, later runs reuse the process
        alone = {**{key: min(run[key] for run in alones) for key in alones[0]}, "startup_s": alones[0]["startup_s"]}
        swept = {**{key: min(run[key] for run in sweeps) for key in sweeps[0]}, "startup_s": sweeps[0]["startup_s"]}
    print(f"\n{'fastest of ' + str(args.repeats):<22}{'alone':>10}{'in a sweep':>12}{'overhead':>10}")
    for key, label in (("iteration_s", "s per iteration"), ("validation_s", "s per validation"),
                       ("startup_s", "start-up s")):
        ratio = swept[key] / alone[key] - 1 if alone[key] else float("nan")
        print(f"{label:<22}{alone[key]:>10.3f}{swept[key]:>12.3f}{100 * ratio:>9.1f}%")


if __name__ == "__main__":
    main()
