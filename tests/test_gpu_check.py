"""`benchmarks/gpu_check.py --smoke`: every section runs on CPU and reports numbers, none an error."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SECTIONS = {"setup", "train_step", "data_pipeline", "sweep", "evaluate"}
STEP_METRICS = {"images_per_s", "step_ms", "peak_rss_mib", "encoder_ms", "grad_cam_ms", "refine_ms",
                "par_pseudo_ms", "decoder_loss_ms", "backward_ms", "rest_ms"}


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
        assert metrics["images_per_s"] > 0 and metrics["encoder_ms"] > 0 and metrics["backward_ms"] > 0
    workers = {row["setting"] for row in rows if row["section"] == "data_pipeline"}
    assert workers == {"0 workers", "2 workers"}
    sweep = {row["metric"]: row["value"] for row in rows if row["section"] == "sweep"}
    assert sweep["trials_completed"] == 2
    assert "| section | setting | metric | value |" in done.stdout
