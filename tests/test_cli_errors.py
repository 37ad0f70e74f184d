"""User errors at the CLI are one line, never a traceback (issue 9, item 14)."""

from __future__ import annotations

import argparse

import pytest

from affseg.backbones import build_encoder
from affseg.backbones.demo_weights import default_checkpoint
from affseg.cli import build_parser, main
from affseg.config import ConfigError


def _one_error_line(capsys, command: str) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"affseg {command}: error:"), captured.err
    assert "Traceback" not in captured.out + captured.err
    return lines[0]


def test_unwritable_output_folder_is_one_line(small_demo, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")  # as root, chmod does not stop writes; a file in the path does
    out = blocker / "run"
    code = main(["train", "--out", str(out), f"data.root={small_demo}", "data.demo=false",
                 "model.checkpoint=random", "train.iterations=1"])
    assert code == 2
    line = _one_error_line(capsys, "train")
    assert str(out) in line and "writable" in line


def test_unknown_encoder_is_one_line_listing_the_names(small_demo, capsys):
    assert main(["train", f"data.root={small_demo}", "data.demo=false", "model.encoder=swin_huge"]) == 2
    line = _one_error_line(capsys, "train")
    assert "model.encoder" in line and "swin_huge" in line and "unicl_swin_b" in line
    assert "weights file" not in line  # not the misleading "needs its weights file"
    with pytest.raises(ConfigError, match="unknown encoder"):
        build_encoder("swin_huge")
    with pytest.raises(ConfigError, match="unknown encoder"):
        default_checkpoint("swin_huge", "")


def test_every_pretrain_flag_has_help():
    parser = build_parser()
    sub = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
    flags = [action for action in sub.choices["pretrain"]._actions if action.option_strings != ["-h", "--help"]]
    assert len(flags) >= 12
    for action in flags:
        assert action.help and len(action.help.split()) >= 3, action.option_strings
