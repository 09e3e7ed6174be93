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
