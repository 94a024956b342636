"""What `pip install certprune` gets: the wheel holds every module of the source tree, under the names it imports
by, and its package data. (scripts/check_wheel.sh, run by CI, then installs that wheel and runs it.)"""
from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
INSTALLED_AS = {"certprune": "certprune", "models": "certprune/models", "certify": "certprune/certify"}


def source_modules() -> set[str]:
    """Every tracked module's path inside the installed package, e.g. ``certprune/certify/milp.py``."""
    found = set()
    for folder, installed in INSTALLED_AS.items():
        for path in (ROOT / folder).rglob("*.py"):
            if "__pycache__" not in path.parts:
                found.add(f"{installed}/{path.relative_to(ROOT / folder).as_posix()}")
    return found


def test_every_folder_with_an_init_is_a_listed_package():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {installed + ("/" + init.parent.relative_to(ROOT / folder).as_posix()).rstrip("/.")
               for folder, installed in INSTALLED_AS.items() for init in (ROOT / folder).rglob("__init__.py")}
    assert {name.replace("/", ".") for name in folders} == listed


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    """Built from a copy of the sources: an in-tree build/ left by an earlier build would hide a missing package."""
    source, out = tmp_path_factory.mktemp("source") / "certprune", tmp_path_factory.mktemp("dist")
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".*", "build", "dist", "runs", "*.egg-info",
                                                                "__pycache__", "tests", "benchmarks"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", str(source),
                    "-w", str(out)], check=True, capture_output=True, cwd=out)
    return zipfile.ZipFile(next(out.glob("certprune-*.whl")))


def test_the_wheel_holds_every_module_and_the_embedded_data(wheel):
    names = set(wheel.namelist())
    assert source_modules() - names == set()
    assert "certprune/data_files/mnist10k.npz" in names


def test_the_wheel_declares_the_console_script(wheel):
    entry_points = next(n for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt"))
    assert "certprune = certprune.cli:main" in wheel.read(entry_points).decode()
