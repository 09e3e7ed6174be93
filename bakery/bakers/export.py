"""The one export path: every baker's folder is assembled here. The baker writes the weights and
``config.json`` (:class:`~bakery.bakers.plan.Weights`); this module adds the source's other files
(tokenizer, generation config, ...), ``vectors/<trait>.safetensors``, ``bake.yaml``,
``bakery.json`` and the model card, in a temporary folder renamed into place at the end."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from bakery.bakers.plan import BakeFacts, Weights
from bakery.bakers.registry import get_baker
from bakery.bakers.request import BakeRequest
from bakery.io.checkpoint import INDEX_FILE
from bakery.io.manifest import BakeTerm, Manifest, versions
from bakery.models import config_hash
from bakery.naming import slug

# Files of the source folder that are not copied: weights, index, card, manifests.
_SKIP_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5", ".ckpt")
_SKIP_NAMES = {"config.json", "README.md", "bakery.json", "bake.yaml", "bakery_source.json",
               INDEX_FILE, "pytorch_model.bin.index.json"}


def vector_file_for(trait: str) -> str:
    """Where an export keeps the vector of ``trait`` (relative to the export folder)."""
    return f"vectors/{slug(trait)}.safetensors"


def source_info_for(model_name: str, model_dir: Path, config: dict[str, Any]) -> dict[str, Any]:
    """:func:`source_info` for bakers that do not go through a :class:`BakeRequest`."""
    d = Path(model_dir)
    info: dict[str, Any] = {"model": model_name, "path": str(d), "config_hash": config_hash(config)}
    prov = d / "bakery_source.json"
    if prov.is_file():
        try:
            p = json.loads(prov.read_text())
            info["hub_id"] = p.get("hub_id")
            info["license"] = p.get("license")
            info["converted_from"] = p.get("gguf")
        except ValueError:
            pass
    parts = d.resolve().parts
    if "snapshots" in parts:  # a Hub cache snapshot: models--org--name/snapshots/<rev>
        i = parts.index("snapshots")
        info["revision"] = parts[i + 1] if i + 1 < len(parts) else None
        repo = parts[i - 1]
        if repo.startswith("models--"):
            info.setdefault("hub_id", repo[len("models--"):].replace("--", "/"))
    if not info.get("hub_id"):
        name = config.get("_name_or_path") or ""
        if name.count("/") == 1 and not Path(name).exists():
            info["hub_id"] = name
    return info


def _copy_aux(src: Path, dst: Path) -> list[str]:
    copied = []
    for p in sorted(src.iterdir()):
        if p.is_file() and p.suffix not in _SKIP_SUFFIXES and p.name not in _SKIP_NAMES \
                and not p.name.startswith("."):
            shutil.copy2(p, dst / p.name)
            copied.append(p.name)
    return copied


def _save_vectors(folder: Path, req: BakeRequest) -> list[BakeTerm]:
    (folder / "vectors").mkdir(exist_ok=True)
    terms: list[BakeTerm] = []
    written: dict[str, str] = {}  # file -> sha
    for t in req.terms:
        sha = t.vector.sha256()
        name, k = Path(vector_file_for(t.trait)).name, 2
        base = name.removesuffix(".safetensors")
        while name in written and written[name] != sha:
            name, k = f"{base}-{k}.safetensors", k + 1
        if name not in written:
            t.vector.save(folder / "vectors" / name)
            written[name] = sha
        terms.append(BakeTerm(layer=t.layer, coef=t.coef, trait=t.trait,
                              vector_file=f"vectors/{name}", vector_sha256=sha))
    return terms


def _bake_recipe(req: BakeRequest, terms: list[BakeTerm], uses_coef: bool) -> dict[str, Any]:
    """``bake.yaml``: the bake as a recipe that ``bakery bake --recipe`` reads back."""
    d: dict[str, Any] = {"model": req.model_name, "method": req.method}
    d["terms"] = [{"vector": t.vector_file, "layer": t.layer, **({"coef": t.coef} if uses_coef else {}),
                   "trait": t.trait} for t in terms]
    opts = req.cfg.given()
    if opts:
        d["options"] = opts
    return d


def write_export(req: BakeRequest, weights: Weights, *, force: bool = False, progress: bool = True,
                 max_shard_bytes: int | None = None, folder: Path | None = None) -> Path:
    """Write the export of ``req`` to ``req.out`` (or ``folder``) atomically and return it."""
    from bakery.io.folders import EXPORT, atomic_folder

    final = Path(folder or req.out)
    with atomic_folder(final, kind=EXPORT, force=force) as tmp:
        fill_export(tmp, req, weights, final=final, progress=progress, max_shard_bytes=max_shard_bytes,
                    uses_coef=get_baker(req.method).uses_coef)
    return final


def fill_export(folder: Path, req: BakeRequest, weights: Weights, *, final: Path, progress: bool,
                max_shard_bytes: int | None, uses_coef: bool) -> Manifest:
    """Everything of an export inside ``folder``: weights first, then the common files."""
    import yaml

    from bakery.io.card import write_card

    facts: BakeFacts = weights.write(folder, progress=progress, max_shard_bytes=max_shard_bytes)
    config = json.loads((folder / "config.json").read_text())
    _copy_aux(req.model_dir, folder)
    terms = _save_vectors(folder, req)
    (folder / "bake.yaml").write_text(yaml.safe_dump(_bake_recipe(req, terms, uses_coef), sort_keys=False))
    manifest = Manifest(
        method=req.method, terms=terms, positions=facts.positions, route=facts.route, site=facts.site,
        exact=facts.exact, source=source_info_for(req.model_name, req.model_dir, req.config),
        ablation=facts.ablation, engines=facts.engines, options=req.cfg.given(), versions=versions(),
        command=req.command,
        extra={"notes": facts.notes, "warnings": facts.warnings,
               "output_config_hash": config_hash(config),
               "architecture": (config.get("architectures") or [None])[0], **facts.extra},
    )
    manifest.save(folder)
    write_card(folder, manifest, final=final, config=req.cfg, section=facts.card_section)
    return manifest
