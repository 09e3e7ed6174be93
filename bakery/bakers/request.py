"""A bake as asked: its terms (vector, layer, strength) and the method's typed config."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from bakery.arch import ENGINES, ArchSpec, spec_for
from bakery.bakers.errors import BakeError
from bakery.vectors.artifact import VectorArtifact

ENGINE_CHOICES = (*ENGINES, "sglang-native")


@dataclass
class Term:
    """One edit: ``coef * vector[layer]`` at the output of block ``layer - 1``."""

    vector: VectorArtifact
    layer: int
    coef: float | None = None  # None: a method without a strength (ortho)
    trait: str | None = None
    vector_path: Path | None = None

    def __post_init__(self) -> None:
        if self.trait is None:
            self.trait = self.vector.trait if self.vector.trait != "unknown" else (
                Path(self.vector_path).stem if self.vector_path else "vector")

    @property
    def block(self) -> int:
        return self.layer - 1

    def row(self) -> torch.Tensor:
        return self.vector.row(self.layer).float()


@dataclass
class BakeRequest:
    """One bake: the resolved model, the terms and the method's typed config (``cfg``)."""

    model_dir: Path
    model_name: str
    config: dict[str, Any]
    terms: list[Term]
    method: str
    cfg: Any  # the method's BakerConfig
    out: Path | None = None  # the final export folder
    command: str = ""

    @property
    def spec(self) -> ArchSpec:
        return spec_for(self.config)

    @property
    def route(self) -> str:
        return getattr(self.cfg, "route", None) or "bias"

    @property
    def site(self) -> str:
        return getattr(self.cfg, "site", None) or "resid-out"

    @property
    def target_engines(self) -> tuple[str, ...]:
        return parse_engines(getattr(self.cfg, "target_engines", None))


def parse_engines(value: str | Sequence[str] | None) -> tuple[str, ...]:
    """``"transformers,vllm"`` -> ("transformers", "vllm"); checks the names."""
    if value is None:
        return ENGINES
    items = value.split(",") if isinstance(value, str) else list(value)
    items = [i.strip().lower() for i in items if i.strip()]
    bad = [i for i in items if i not in ENGINE_CHOICES]
    if bad or not items:
        raise BakeError(f"unknown target engine(s) {', '.join(bad) or '(none)'}; choose from "
                        f"{', '.join(ENGINE_CHOICES)} (comma-separated)")
    return tuple(dict.fromkeys(items))
