"""`affseg train --print-config` (issue 10 item 6): the resolved configuration, defaults ← file ← preset ←
overrides, exactly what `train` would run, printed as YAML without training."""

from __future__ import annotations

import pytest
import yaml

import affseg.train
from affseg.cli import main
from affseg.config import load_config, packaged_config, preset_overrides, to_dict


@pytest.fixture
def no_training(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("--print-config must not train")

    monkeypatch.setattr(affseg.train, "train", refuse)


def _printed(capsys, argv: list[str]) -> dict:
    assert main(["train", "--print-config", *argv]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    return yaml.safe_load(captured.out)


def test_prints_file_then_overrides(tmp_path, capsys, no_training):
    path = tmp_path / "mine.yaml"
    path.write_text("refine: {alpha: 4}\ntrain: {iterations: 7}\n")
    out = tmp_path / "run"
    overrides = ["refine.alpha=3", "model.decoder_stages=[2, 3]"]
    printed = _printed(capsys, ["--config", str(path), "--out", str(out), *overrides])
    assert printed == to_dict(load_config(path, [*overrides, f"train.out_dir={out}"]))
    assert printed["refine"]["alpha"] == 3 and printed["train"]["iterations"] == 7
    assert printed["model"]["decoder_stages"] == [2, 3] and printed["train"]["out_dir"] == str(out)
    assert not out.exists()


def test_default_config_with_preset(capsys, no_training):
    printed = _printed(capsys, ["--preset", "reference", "refine.bg_power=2"])
    demo = packaged_config("demo")
    assert printed == to_dict(load_config(demo, [*preset_overrides("reference"), "refine.bg_power=2"]))
    assert printed["refine"]["box_clip"] == "reference" and printed["refine"]["bg_power"] == 2.0


def test_bad_key_is_the_usual_one_line_error(capsys, no_training):
    assert main(["train", "--print-config", "refine.alpah=3"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    (line,) = captured.err.strip().splitlines()
    assert line.startswith("affseg train: error:") and "unknown key refine.alpah" in line
