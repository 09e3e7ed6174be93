"""``bakery.json``: what was baked, from which vector and source, so a bake can be checked,
compared and reproduced."""

from __future__ import annotations

import json
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bakery.errors import BakeryError

MANIFEST_NAME = "bakery.json"


class ManifestError(BakeryError, FileNotFoundError):
    """An export folder without a readable ``bakery.json``."""


@dataclass
class BakeTerm:
    """One (vector, layer, coef) edit. ``layer`` is the artifact row; ``block = layer - 1``."""

    layer: int
    coef: float | None  # None: a method without a strength (ortho)
    trait: str
    vector_file: str  # relative to the export folder, e.g. vectors/pirate.safetensors
    vector_sha256: str

    @property
    def block(self) -> int:
        return self.layer - 1

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "block": self.block}


@dataclass
class Manifest:
    method: str  # bias | ortho | kl-lora | kl-full
    terms: list[BakeTerm]
    positions: str = "all"  # the runtime-steering positions this bake stands for
    route: str | None = None  # e.g. mlp-bias, attn-bias, rank1, ortho, ortho+bias
    site: str = "resid-out"  # resid-out (output of block L-1) or attn-out (after attention of block L)
    exact: bool = False
    source: dict[str, Any] = field(default_factory=dict)  # model, path, config_hash, revision
    ablation: dict[str, Any] | None = None  # ortho: direction layer, blocks, embeddings
    engines: dict[str, str] = field(default_factory=dict)  # engine -> ok | drop | launch flag
    options: dict[str, Any] = field(default_factory=dict)  # the method's config, as given
    versions: dict[str, str] = field(default_factory=dict)
    command: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["terms"] = [t.to_dict() for t in self.terms]
        return d

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / MANIFEST_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, folder: str | Path) -> "Manifest":
        path = Path(folder) / MANIFEST_NAME
        if not path.is_file():
            raise ManifestError(
                f"{folder} has no {MANIFEST_NAME}: it is not a bakery export (bake one with "
                "`bakery bake`), or pass --vector/--layer/--coef explicitly"
            )
        try:
            d = json.loads(path.read_text())
            terms = [BakeTerm(**{k: v for k, v in t.items() if k != "block"}) for t in d.pop("terms")]
            return cls(terms=terms, **d)
        except (json.JSONDecodeError, TypeError, KeyError) as e:
            raise ManifestError(f"{path} is not a valid bakery manifest: {e}") from e


def versions() -> dict[str, str]:
    """Versions of the packages that shape a bake's result."""
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("bakery", "torch", "transformers", "safetensors", "peft"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out
