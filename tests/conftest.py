"""Shared fixtures: tiny random models per architecture and the embedded SmolLM2 model."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from engine_group import pytest_collection_modifyitems  # noqa: E402,F401  (the hook, installed here)
from tiny import ARCH_TYPES, make_tiny  # noqa: E402


def _session_threads() -> int:
    """Torch threads for this test process: the cores shared by the xdist workers (at least 1)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    return max(1, (os.cpu_count() or 1) // workers)


def pytest_configure(config) -> None:
    import torch

    torch.set_num_threads(_session_threads())


@pytest.fixture(autouse=True)
def _threads_restored():
    """``--threads N`` sets torch's threads process-wide: put them back after every test, so a
    test's speed does not depend on the order the tests ran in."""
    import torch

    before = torch.get_num_threads()
    yield
    if torch.get_num_threads() != before:
        torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """``tiny_models(model_type, **config_overrides)`` -> folder, built once per settings."""
    built: dict = {}

    def get(model_type: str, **overrides) -> Path:
        key = (model_type, tuple(sorted(overrides.items())))
        if key not in built:
            folder = tmp_path_factory.mktemp(f"tiny-{model_type}")
            built[key] = make_tiny(model_type, folder, **overrides)
        return built[key]

    return get


@pytest.fixture(params=ARCH_TYPES)
def arch_type(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def smol_dir() -> Path:
    """The embedded SmolLM2-135M-Instruct, converted once into the bakery cache."""
    from bakery.models import DEFAULT_MODEL, resolve_model

    return resolve_model(DEFAULT_MODEL)


@pytest.fixture(scope="module")
def vec_file(tmp_path_factory) -> Path:
    """A random direction for the tiny models (hidden 32, 4 blocks): the distillation tests' vector."""
    import torch

    from bakery.vectors.artifact import VectorArtifact

    torch.manual_seed(1)
    p = tmp_path_factory.mktemp("vec") / "rand.safetensors"
    VectorArtifact(torch.randn(5, 32), {"trait": "rand"}).save(p)
    return p


@pytest.fixture(scope="session")
def smol_pirate(smol_dir):
    """The embedded model's quick contrastive pirate vector (tests/quick_vectors.py), computed once."""
    from quick_vectors import contrastive_pirate

    return contrastive_pirate(smol_dir)


@pytest.fixture(scope="session")
def smol_pirate_bias(smol_dir, smol_pirate, tmp_path_factory):
    """One bias bake of the embedded model (``SMOL_LAYER``, ``SMOL_COEF``), shared by every test that
    needs a real exact export to read, convert or serve (none may write into it)."""
    from bakery.bakers import bake

    tmp = tmp_path_factory.mktemp("smol-pirate-bias")
    vec_file = smol_pirate.save(tmp / "pirate.safetensors")
    return bake("bias", smol_dir, [(vec_file, SMOL_LAYER, SMOL_COEF)], tmp / "bias", progress=False)


SMOL_LAYER, SMOL_COEF = 16, 2.0


DISTILL_LAYER, DISTILL_COEF = 2, 2.0


@pytest.fixture(scope="session")
def distilled(tiny_models, tmp_path_factory):
    """``distilled(arch, method)`` -> (source, export, vector): one short distillation of a tiny
    model per architecture and method (random vector, seed 28; layer 2, coef 2, positions all,
    30 steps), baked once and shared by the tests that read it (none may write into it)."""
    built: dict = {}

    def get(arch: str, method: str):
        if (arch, method) not in built:
            from bakery.bakers import bake
            from helpers import vec

            src = tiny_models(arch)
            tmp = tmp_path_factory.mktemp(f"distilled-{arch}-{method}")
            v = vec(src, seed=28)
            v.save(tmp / "v.safetensors")
            opts = dict(rank=8, lr=5e-3) if method == "kl-lora" else dict(lr=1e-3)
            out = bake(method, str(src), [(str(tmp / "v.safetensors"), DISTILL_LAYER, DISTILL_COEF)], tmp / "out",
                       num_prompts=40, samples_per_prompt=1, max_new_tokens=12, steps=30, val_prompts=6,
                       val_every=10, positions="all", work_dir=str(tmp / "work"), progress=False, **opts)
            built[(arch, method)] = (src, out, v)
        return built[(arch, method)]

    return get
