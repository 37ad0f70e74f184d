"""`benchmarks/gpu_check.py --smoke`: every section runs on CPU and reports numbers, none an error;
the phase instrumentation of `benchmarks/stages.py` sees every phase of a real `Trainer._step`."""

from __future__ import annotations

import importlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SECTIONS = {"setup", "train_step", "data_pipeline", "sweep", "evaluate"}
PHASE_METRICS = {"encoder_ms", "grad_cam_ms", "refine_ms", "par_pseudo_ms", "decoder_loss_ms", "backward_ms", "rest_ms"}
STEP_METRICS = {"images_per_s", "step_ms", "peak_rss_mib", *PHASE_METRICS}


def test_instrumented_step_enters_every_phase_and_restores_the_method(small_demo, tmp_path, monkeypatch):
    from test_train import tiny_config

    from affseg.engine.trainer import Trainer
    from affseg.method import PseudoLabeler

    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    stages = importlib.import_module("stages")
    trainer = Trainer(tiny_config(small_demo, tmp_path, "data.num_workers=0"))
    trainer.iteration = trainer.heads[0].labeler.refine_start  # A_f takes part, as gpu_check times it
    decoder = trainer.heads[0].student.decoder
    originals = {key: getattr(*key) for key in stages.MODULE_PHASES}
    call, backward = PseudoLabeler.__call__, torch.Tensor.backward
    clock = stages.PhaseClock(torch.device("cpu"))
    with stages.instrumented(trainer.teacher, [head.student for head in trainer.heads], clock):
        stages.timed(lambda: trainer._step(iter(trainer._loader())), clock)
    assert set(clock.seconds) == {*stages.PHASES, stages.REST}
    assert {key: getattr(*key) for key in stages.MODULE_PHASES} == originals
    assert PseudoLabeler.__call__ is call and torch.Tensor.backward is backward
    assert not stages.block_end_module(trainer.teacher)._forward_hooks
    assert not decoder._forward_pre_hooks and not decoder._forward_hooks


@pytest.mark.slow
def test_gpu_check_smoke_reports_every_section(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    for name in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI"):
        env.pop(name, None)
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--smoke", "--out", str(out),
                           "--work", str(tmp_path / "work")], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert set(result["sections"]) == SECTIONS
    assert all(section["status"] == "ok" for section in result["sections"].values())
    rows = result["rows"]
    assert {row["section"] for row in rows} == SECTIONS
    assert all(row["metric"] != "error" and isinstance(row["value"], float) and math.isfinite(row["value"])
               for row in rows)
    for size in (64, 96):
        metrics = {row["metric"]: row["value"] for row in rows if row["setting"] == f"{size}px b4x2"}
        assert STEP_METRICS <= set(metrics)
        assert metrics["images_per_s"] > 0 and all(metrics[name] > 0 for name in PHASE_METRICS)
    workers = {row["setting"] for row in rows if row["section"] == "data_pipeline"}
    assert workers == {"0 workers", "2 workers"}
    sweep = {row["metric"]: row["value"] for row in rows if row["section"] == "sweep"}
    assert sweep["trials_completed"] == 2
    assert "| section | setting | metric | value |" in done.stdout
