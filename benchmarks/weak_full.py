"""Weak / full: the decoder trained on pseudo-labels against the same decoder trained on ground-truth masks
(`train.supervision=full`) at an equal schedule on the demo set — the ratio WSSS papers report.

    python benchmarks/weak_full.py [--seeds 0,1]
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from demo_schedule import last_validation, train_on_demo  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0", help="comma-separated training seeds, averaged")
    seeds = [int(s) for s in parser.parse_args().seeds.split(",")]
    scores = {}
    for supervision in ("pseudo", "full"):
        runs = [last_validation(train_on_demo([f"train.supervision={supervision}"], seed)) for seed in seeds]
        scores[supervision] = sum(r["val/miou"] for r in runs) / len(runs)
        print(f"{supervision:<8} decoder val mIoU {scores[supervision]:5.1f} %", flush=True)
    print(f"weak/full: {scores['pseudo'] / scores['full']:.2f} (demo set, seeds {seeds})")


if __name__ == "__main__":
    main()
