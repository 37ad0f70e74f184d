"""End to end on the demo set with the committed pre-trained tiny encoder (same code path as VOC).

The refinement is the method's contribution: its pseudo-labels (random walk + PAR) must beat the raw
CAMs, and the decoder trained on them must beat the raw CAMs on val.
"""

import numpy as np
import pytest

from affseg.callbacks import Callback
from affseg.config import load_config, packaged_config
from affseg.data.demo import DemoSpec, make_demo
from affseg.train import train

REFINE_GAIN = 0.03  # `refined` pseudo-label mIoU must exceed `cam` by at least 3 points
E2E_OVERRIDES = (
    "train.iterations=60", "train.val_interval=30", "train.log_interval=5",
    "data.val_limit=60", "data.pseudo_subset=48",
)


class LossLog(Callback):
    def __init__(self):
        self.losses = []

    def on_log(self, iteration, values):
        self.losses.append(values["loss"])


@pytest.fixture(scope="session")
def demo_training(tmp_path_factory):
    """One short demo training shared by the assertions below."""
    root = make_demo(tmp_path_factory.mktemp("e2e"), DemoSpec(seed=0, train=200, val=60, test=1))
    out = tmp_path_factory.mktemp("e2e_run")
    config = load_config(packaged_config("demo"), [f"data.root={root}", "data.demo=false", f"train.out_dir={out}",
                                                   *E2E_OVERRIDES])
    log = LossLog()
    result = train(config, [log])
    return result, log.losses


def test_training_lowers_the_loss(demo_training):
    _, losses = demo_training
    assert np.mean(losses[-3:]) < np.mean(losses[:3])


def test_refined_pseudo_labels_beat_raw_cams(demo_training):
    result, _ = demo_training
    pseudo = result.history[-1].pseudo
    assert pseudo["refined"] >= pseudo["cam"] + REFINE_GAIN, pseudo


def test_decoder_beats_raw_cams(demo_training):
    result, _ = demo_training
    last = result.history[-1]
    assert last.miou > last.pseudo["cam"], (last.miou, last.pseudo)
