"""Packaging (issue 9, item 17): the top-level sweeps/ folder ships as package `affseg.sweeps`, so an installed
(non-editable) affseg finds its search spaces and profiles, and the packaged configs and presets
(affseg/configs/presets/, `--preset`); every subpackage is listed in pyproject.toml."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCE_SKIP = shutil.ignore_patterns("__pycache__", "*.pyc", "*.pth")  # weights are not needed to test layout
LOAD_REFINE = ("import affseg, affseg.sweep.space as space; spec = space.load_space('refine', 'demo'); "
               "print(affseg.__file__); print(spec.path); print(len(spec.parameters))")
LOAD_PRESET = "from affseg.config import preset_overrides; print(*preset_overrides('reference'))"


def _setuptools() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_every_subpackage_is_listed():
    on_disk = {".".join(init.parent.relative_to(REPO).parts) for init in (REPO / "affseg").rglob("__init__.py")}
    listed = set(_setuptools()["packages"])
    assert on_disk | {"affseg.sweeps"} == listed
    assert _setuptools()["package-dir"]["affseg.sweeps"] == "sweeps"


def test_sweeps_resolve_from_any_working_directory(tmp_path):
    """The environment's own affseg (editable here) finds the spaces through importlib.resources."""
    code = "import importlib.resources as r; print((r.files('affseg.sweeps') / 'profiles' / 'demo.yaml').is_file())"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True"]


def test_installed_wheel_ships_the_sweep_files(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for name in ("affseg", "sweeps"):
        shutil.copytree(REPO / name, source / name, ignore=SOURCE_SKIP)
    wheels = tmp_path / "wheels"
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(source)],
                   check=True, capture_output=True, cwd=source)
    (wheel,) = wheels.glob("affseg-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"affseg/sweeps/{p.relative_to(REPO / 'sweeps')}" for p in (REPO / "sweeps").rglob("*.yaml")}
    assert "affseg/sweeps/refine.yaml" in expected and expected <= names
    configs = {f"affseg/{p.relative_to(REPO / 'affseg')}" for p in (REPO / "affseg" / "configs").rglob("*.yaml")}
    assert "affseg/configs/presets/reference.yaml" in configs and configs <= names

    target = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)], check=True, capture_output=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run([sys.executable, "-c", LOAD_REFINE], cwd=elsewhere, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    package, space, count = out.stdout.split()
    assert Path(package).is_relative_to(target) and Path(space) == target / "affseg" / "sweeps" / "refine.yaml"
    assert int(count) > 0
    preset = subprocess.run([sys.executable, "-c", LOAD_PRESET], cwd=elsewhere, env=env, capture_output=True, text=True)
    assert preset.returncode == 0, preset.stderr[-2000:]
    assert 'refine.box_clip="reference"' in preset.stdout.split()
