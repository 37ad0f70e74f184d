"""Which Swin stages should feed the decoder and the affinities (SPEC §5.3, the paper's named limitation)?

Trains the demo configuration with decoder/affinity stages [3], [2,3] and [2,3,4] on the demo schedule and
prints the final pseudo-label mIoU (`cam`, `refined`) and decoder val mIoU. The sweep `sweeps/stages.yaml`
decides for a real dataset; this is the demo-set measurement.

    python benchmarks/feature_stages.py [--seeds 0,1]
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from demo_schedule import last_validation, train_on_demo  # noqa: E402

SETTINGS = {
    "[3]": [],
    "[2,3]": ["model.decoder_stages=[2,3]", "model.affinity_stages=[2,3]"],
    "[2,3,4]": ["model.decoder_stages=[2,3,4]", "model.affinity_stages=[2,3,4]"],
}
COLUMNS = ("pseudo/cam", "pseudo/refined", "val/miou")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0", help="comma-separated training seeds, averaged")
    seeds = [int(s) for s in parser.parse_args().seeds.split(",")]
    print(f"{'stages':<10}" + "".join(f"{c:>16}" for c in COLUMNS) + "   (mIoU %, demo set, final validation, "
          f"mean of seeds {seeds})")
    for name, overrides in SETTINGS.items():
        runs = [last_validation(train_on_demo(overrides, seed)) for seed in seeds]
        print(f"{name:<10}" + "".join(f"{sum(r[c] for r in runs) / len(runs):>16.1f}" for c in COLUMNS), flush=True)


if __name__ == "__main__":
    main()
