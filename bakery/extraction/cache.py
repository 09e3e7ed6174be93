"""The extraction cache and the files of one extraction.

Every extraction is stored under ``cache_dir()/vectors/<model>-<config hash>/<trait>-<settings
hash>/`` so that a re-run with the same model, recipe and settings is instant and other commands
can take ``--trait NAME``. An entry holds ``vector.safetensors`` (``response_avg``), its two
sibling variants, the answers (``vector.responses.jsonl``) and the per-layer plot; ``extract -o``
publishes the same files under the name the user chose.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from bakery.errors import BakeryError
from bakery.extraction import diagnostics
from bakery.traits import TraitRecipe
from bakery.io.folders import ANSWERS, EXTRACTION_ENTRY, PLOT, VECTOR, atomic_files, atomic_folder
from bakery.models import cache_dir, read_config, resolve_model, config_hash
from bakery.naming import slug
from bakery.vectors.artifact import VectorArtifact

MAIN_FILE = "vector.safetensors"


class NotCached(BakeryError, FileNotFoundError):
    """No extraction of that trait for that model in the cache."""


# ---- model identity -----------------------------------------------------------------------------
def model_id(model: str | os.PathLike | None) -> tuple[str, Path, dict[str, Any]]:
    """(id to record, resolved folder, config). Built-in aliases record their Hub id."""
    path = resolve_model(model)
    cfg = read_config(path)
    src = path / "bakery_source.json"
    if src.is_file():
        mid = json.loads(src.read_text()).get("hub_id") or str(model)
    else:
        mid = cfg.get("_name_or_path") or (str(model) if model and not Path(str(model)).exists() else path.name)
    return str(mid), path, cfg


def settings_hash(recipe: TraitRecipe, settings) -> str:
    """Hash of the recipe's content, the settings that shape a vector (``settings.key()``) and
    the diagnostics version: the name of a cache entry."""
    blob = json.dumps({"recipe": recipe.content_hash(), "settings": settings.key(),
                       "diagnostics": diagnostics.DIAGNOSTICS_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


# ---- the cache ----------------------------------------------------------------------------------
def vectors_cache_root() -> Path:
    return cache_dir() / "vectors"


def model_cache_dir(model: str | os.PathLike | None) -> Path:
    mid, _, cfg = model_id(model)
    return vectors_cache_root() / f"{slug(mid, empty='model')}-{config_hash(cfg)}"


def entry_dir(model: str | os.PathLike | None, recipe: TraitRecipe, settings) -> Path:
    return model_cache_dir(model) / f"{recipe.name}-{settings_hash(recipe, settings)}"


def list_cached(model: str | os.PathLike | None = None) -> list[tuple[str, Path]]:
    """(trait, main vector file) for every cached extraction of ``model``, newest first."""
    d = model_cache_dir(model)
    if not d.is_dir():
        return []
    found = []
    for entry in d.iterdir():
        main = entry / MAIN_FILE
        if entry.is_dir() and main.is_file():
            found.append((entry.name.rsplit("-", 1)[0], main, main.stat().st_mtime))
    found.sort(key=lambda t: -t[2])
    return [(t, p) for t, p, _ in found]


def cached_vector(trait: str, model: str | os.PathLike | None = None) -> Path | None:
    """The newest cached ``response_avg`` vector of ``trait`` for ``model``, or None."""
    for t, p in list_cached(model):
        if t == trait:
            return p
    return None


def resolve_trait(trait: str, model: str | os.PathLike | None = None) -> Path:
    """Like :func:`cached_vector`, but a clear error that says how to extract it when missing."""
    p = cached_vector(trait, model)
    if p is None:
        have = sorted({t for t, _ in list_cached(model)})
        raise NotCached(
            f"no cached vector for trait '{trait}' and model '{model or 'default'}' (cached: "
            f"{', '.join(have) or 'none'}). Run `bakery extract --recipe {trait}` first, or pass "
            "--vector FILE.")
    return p


# ---- the files of one extraction ----------------------------------------------------------------
def sibling_paths(out: str | os.PathLike) -> dict[str, Path]:
    """Files written beside the main vector ``NAME.safetensors``."""
    out = Path(out)
    stem = out.name[: -len(".safetensors")] if out.name.endswith(".safetensors") else out.stem
    return {
        "response_avg": out,
        "prompt_avg": out.with_name(f"{stem}.prompt_avg.safetensors"),
        "prompt_last": out.with_name(f"{stem}.prompt_last.safetensors"),
        "responses": out.with_name(f"{stem}.responses.jsonl"),
        "plot": out.with_name(f"{stem}.layers.png"),
    }


KINDS = {"response_avg": VECTOR, "prompt_avg": VECTOR, "prompt_last": VECTOR, "responses": ANSWERS,
         "plot": PLOT}


def output_targets(out: str | os.PathLike) -> dict[Path, Any]:
    """``{path: kind}`` of every file ``extract -o out`` writes (for the overwrite rule)."""
    return {p: KINDS[k] for k, p in sibling_paths(out).items()}


def write_entry(entry: Path, arts: dict[str, VectorArtifact], rows: list[dict], stats: list[dict],
                recommended: int, title: str) -> None:
    """Write a cache entry atomically: vector[.variant].safetensors, responses.jsonl, layers.png.
    An older entry of the same name (a re-extraction) is replaced."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    with atomic_folder(entry, kind=EXTRACTION_ENTRY, force=True) as tmp:
        names = sibling_paths(tmp / MAIN_FILE)
        for v, art in arts.items():
            art.save(names[v])
        with open(names["responses"], "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        diagnostics.plot(stats, names["plot"], title=title, recommended=recommended)


def publish(entry: Path, out: str | os.PathLike, *, force: bool = False) -> dict[str, Path]:
    """Copy a cache entry to ``out`` and its siblings under the overwrite rule
    (:mod:`bakery.io.folders`): temporary files first, renamed at the end."""
    src = sibling_paths(entry / MAIN_FILE)
    dst = sibling_paths(out)
    with atomic_files(output_targets(out), force=force) as tmps:
        for k in src:
            shutil.copyfile(src[k], tmps[dst[k]])
    return dst
