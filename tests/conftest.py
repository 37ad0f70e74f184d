"""Shared fixtures: a small demo dataset built once per session."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest
import torch

from affseg.data.demo import DemoSpec, make_demo

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", min(2, os.cpu_count() or 1))))

SMALL_DEMO = DemoSpec(seed=3, train=24, val=8, test=4)


@pytest.fixture(scope="session")
def small_demo(tmp_path_factory):
    """A 24/8/4-image demo set in VOC layout; returns its VOC2012 root."""
    return make_demo(tmp_path_factory.mktemp("demo"), SMALL_DEMO)
