"""The one-head reference run: losses and validation metrics of a short, seeded training on the small
demo set, saved from the code before the teacher/students restructure (issue 10). The restructured
loop must reproduce them (tests/test_one_head_reference.py).

Regenerate only in a commit that changes the numbers on purpose, and say why in its message:
    .venv/bin/python tests/one_head_reference.py
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from affseg.callbacks import Callback

REFERENCE_FILE = Path(__file__).parent / "data" / "one_head_reference.json"
# warm-up refinement for 2 iterations, then A_f joins (refine_start 1/3 of 6); two validations
OVERRIDES = ("train.iterations=6", "train.val_interval=3", "train.log_interval=1", "refine.refine_start=0.34")


class _Recorder(Callback):
    def __init__(self):
        self.logs: dict[str, dict[str, float]] = {}
        self.validations: list[dict] = []

    def on_log(self, iteration, values):
        self.logs[str(iteration)] = {k: float(values[k]) for k in ("loss", "loss/seg", "loss/aff", "lr")}

    def on_validation(self, result, checkpoint, is_best):
        self.validations.append({"iteration": result.iteration, **result.metrics()})


def record_run(root: Path, out: Path) -> dict:
    """Train the reference configuration on the demo set at `root`; its logs and validations."""
    from test_train import tiny_config

    from affseg.train import train

    recorder = _Recorder()
    train(tiny_config(root, out, *OVERRIDES), [recorder])
    return {"logs": recorder.logs, "validations": recorder.validations}


def main() -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import SMALL_DEMO

    from affseg.data.demo import make_demo

    with tempfile.TemporaryDirectory() as tmp:
        root = make_demo(Path(tmp) / "demo", SMALL_DEMO)
        run = record_run(root, Path(tmp) / "run")
    REFERENCE_FILE.parent.mkdir(parents=True, exist_ok=True)
    REFERENCE_FILE.write_text(json.dumps(run, indent=1, sort_keys=True) + "\n")
    print(f"wrote {REFERENCE_FILE}")


if __name__ == "__main__":
    main()
