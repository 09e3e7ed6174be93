"""The distribution a user installs: ``python -m build`` makes an sdist and a wheel (the wheel built
from the sdist, so the sdist is complete too), and the wheel, installed into a fresh virtual
environment outside the source tree, runs ``bakery --help``, lists the built-in recipes it carries
and bakes a tiny model."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from bakery.vectors.artifact import VectorArtifact
from tiny import make_tiny

ROOT = Path(__file__).resolve().parents[1]
DIST = "persona-bakery"
SKIP = {".git", "build", "dist", "exports", "__pycache__", ".pytest_cache"}

pytestmark = pytest.mark.slow


def _source_copy(dest: Path) -> Path:
    """The checkout's files without venvs, caches and exports (what a clone holds)."""
    def ignore(folder: str, names: list[str]) -> set[str]:
        return {n for n in names if n in SKIP or n.startswith(".venv") or n.endswith(".egg-info")}

    return Path(shutil.copytree(ROOT, dest, ignore=ignore))


def _run(cmd: list, cwd: Path, **kw) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    r = subprocess.run([str(c) for c in cmd], cwd=cwd, env={**env, "HF_HUB_OFFLINE": "1", **kw.pop("env", {})},
                       capture_output=True, text=True, **kw)
    assert r.returncode == 0, f"{cmd} failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("build")
    src = _source_copy(tmp / "src")
    _run([sys.executable, "-m", "build", "--outdir", tmp / "dist", src], cwd=tmp, timeout=600)
    return tmp / "dist"


def test_the_sdist_and_the_wheel_carry_the_package_and_its_recipes(built):
    (wheel,) = built.glob("persona_bakery-*.whl")
    (sdist,) = built.glob("persona_bakery-*.tar.gz")
    names = zipfile.ZipFile(wheel).namelist()
    assert "bakery/recipes/traits/pirate.yaml" in names and "bakery/recipes/bakes/pirate-bias.yaml" in names
    assert "bakery/engines/vllm_worker.py" in names and "bakery/engines/sglang_stub.py" in names
    assert not any(n.startswith(("tests/", "bench/", "scripts/")) for n in names)
    meta = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert f"Name: {DIST}" in meta
    ep = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    assert "bakery = bakery.cli:main" in ep


def test_the_wheel_in_a_fresh_venv_outside_the_tree_runs_and_bakes(built, tmp_path):
    (wheel,) = built.glob("persona_bakery-*.whl")
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", venv], cwd=tmp_path)
    pip = [venv / "bin" / "python", "-m", "pip", "install", "-q", "-c", ROOT / "requirements" / "bakery.txt"]
    _run([*pip, "torch==2.13.0"], cwd=tmp_path, timeout=900)  # the CPU build, as the Makefile pins it
    _run([*pip, wheel], cwd=tmp_path, timeout=900)
    show = _run([venv / "bin" / "python", "-m", "pip", "show", DIST], cwd=tmp_path).stdout
    assert f"Name: {DIST}" in show and f"Location: {venv}" in show
    where = _run([venv / "bin" / "python", "-c", "import bakery; print(bakery.__file__)"], cwd=tmp_path).stdout
    assert where.startswith(str(venv)), where  # the installed copy, not the source tree
    bakery = venv / "bin" / "bakery"
    assert "bake" in _run([bakery, "--help"], cwd=tmp_path).stdout
    assert "pirate" in _run([bakery, "recipe", "list"], cwd=tmp_path).stdout  # recipes ship in the wheel

    model = make_tiny("llama", tmp_path / "tiny")
    torch.manual_seed(0)
    VectorArtifact(torch.randn(5, 32), {"trait": "rand"}).save(tmp_path / "v.safetensors")
    _run([bakery, "bake", "--method", "bias", "--model", model, "-v", tmp_path / "v.safetensors", "-l", "2",
          "-c", "2", "-o", tmp_path / "out"], cwd=tmp_path, timeout=600)
    manifest = json.loads((tmp_path / "out" / "bakery.json").read_text())
    assert manifest["method"] == "bias" and manifest["terms"][0]["layer"] == 2
    assert (tmp_path / "out" / "model.safetensors").is_file()
