"""Shared fixtures: tiny random models per architecture and the embedded SmolLM2 model."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from tiny import ARCH_TYPES, make_tiny  # noqa: E402

ENGINE_MARKS = ("vllm", "sglang", "llamacpp")


def _session_threads() -> int:
    """Torch threads for this test process: the cores shared by the xdist workers (at least 1)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    return max(1, (os.cpu_count() or 1) // workers)


def pytest_configure(config) -> None:
    import torch

    torch.set_num_threads(_session_threads())


def pytest_collection_modifyitems(config, items) -> None:
    """Tests that start a real engine share one xdist group, so that two engines never run at once
    (each takes every core; two together thrash and time out)."""
    for item in items:
        if any(item.get_closest_marker(m) for m in ENGINE_MARKS):
            item.add_marker(pytest.mark.xdist_group("engines"))


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
