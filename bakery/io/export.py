"""Assemble an export folder: weights (streamed), config, tokenizer and generation config copied,
``bakery.json``, ``bake.yaml``, ``vectors/<trait>.safetensors`` and the model card."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from bakery.bakers.base import BakePlan, BakeRequest
from bakery.io.checkpoint import DTYPES, INDEX_FILE, OutTensor, ShardedWriter
from bakery.io.manifest import BakeTerm, Manifest, versions
from bakery.models import config_hash

# Files of the source folder that are not copied: weights, index, card, manifests.
_SKIP_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5", ".ckpt")
_SKIP_NAMES = {"config.json", "README.md", "bakery.json", "bake.yaml", "bakery_source.json",
               INDEX_FILE, "pytorch_model.bin.index.json"}


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-").lower() or "vector"


def vector_file_for(trait: str) -> str:
    """Where an export keeps the vector of ``trait`` (relative to the export folder)."""
    return f"vectors/{_slug(trait)}.safetensors"


ROW_BLOCK_BYTES = 32 * 1024**2  # float32 working block for row-wise edits of large tensors


def _apply(reader, name: str, edits, dtype: torch.dtype, rowwise: bool, native: bool):
    info = reader.tensors[name]

    def run(x: torch.Tensor) -> torch.Tensor:  # x: a fresh copy in the stored dtype
        x = x if native else x.float()  # edits may work in place
        for fn in edits:
            x = fn(x)
        return x.to(dtype)  # a no-op for native edits

    def produce() -> torch.Tensor:
        return run(reader.get(name))

    def produce_blocks():
        per_row = max(1, info.shape[1])
        rows = max(1, ROW_BLOCK_BYTES // (4 * per_row))
        for i in range(0, info.shape[0], rows):
            yield run(reader.get_rows(name, i, i + rows))

    if rowwise and len(info.shape) == 2 and 4 * info.shape[0] * info.shape[1] > ROW_BLOCK_BYTES:
        return produce_blocks
    return produce


def output_tensors(plan: BakePlan) -> list[OutTensor]:
    """The full output list: copies, edited tensors (float32 math, source dtype) and additions."""
    reader = plan.reader
    out: list[OutTensor] = []
    for name, info in reader.tensors.items():
        if name in plan.edits:
            out.append(OutTensor(name, info.dtype, info.shape,
                                 produce=_apply(reader, name, plan.edits[name], info.torch_dtype,
                                                name in plan.rowwise, name in plan.native)))
        else:
            out.append(OutTensor(name, info.dtype, info.shape, source=info))
    for name, (dtype, shape, make) in sorted(plan.added.items()):
        if callable(make):
            out.append(OutTensor(name, dtype, tuple(shape),
                                 produce=lambda make=make, d=DTYPES[dtype]: make().float().to(d)))
        else:
            out.append(OutTensor(name, dtype, tuple(shape), source=make))
    return out


def source_info(req: BakeRequest) -> dict[str, Any]:
    """Where the bake came from: name as given, folder, Hub id if known, config hash, revision."""
    return source_info_for(req.model_name, req.model_dir, req.config)


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


def _bake_recipe(req: BakeRequest, terms: list[BakeTerm]) -> dict[str, Any]:
    d: dict[str, Any] = {"model": req.model_name, "method": req.method}
    if req.method == "bias":
        d["route"] = req.route
    d["site"] = req.site
    d["target_engines"] = list(req.target_engines)
    d["terms"] = [{"vector": t.vector_file, "layer": t.layer, "coef": t.coef, "trait": t.trait}
                  for t in terms]
    opts = {k: v for k, v in req.options.items() if k != "calibration_prompts"}
    if opts:
        d["options"] = opts
    return d


def write_export(folder: Path, req: BakeRequest, plan: BakePlan, *, final: Path,
                 progress: bool = True, max_shard_bytes: int | None = None) -> Manifest:
    """Write everything into ``folder`` (a temporary folder renamed to ``final`` by the caller)."""
    import yaml
    from tqdm import tqdm

    from bakery.io.card import write_card

    folder = Path(folder)
    tensors = output_tensors(plan)
    total = sum(t.nbytes for t in tensors)
    writer = ShardedWriter(folder, **({"max_shard_bytes": max_shard_bytes} if max_shard_bytes else {}))
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"baking {req.method}",
              disable=not progress, leave=False) as bar:
        writer.write(tensors, progress=bar.update)
    (folder / "config.json").write_text(json.dumps(plan.config, indent=2) + "\n")
    _copy_aux(req.model_dir, folder)
    terms = _save_vectors(folder, req)
    (folder / "bake.yaml").write_text(yaml.safe_dump(_bake_recipe(req, terms), sort_keys=False))
    manifest = Manifest(
        method=req.method, terms=terms, positions=plan.positions, route=plan.route, site=plan.site,
        exact=plan.exact, source=source_info(req), ablation=plan.ablation,
        engines=plan.engines, versions=versions(), command=req.command,
        extra={"notes": plan.notes, "warnings": plan.warnings, "target_engines": list(req.target_engines),
               "output_config_hash": config_hash(plan.config),
               "architecture": (plan.config.get("architectures") or [None])[0], **plan.extra},
    )
    manifest.save(folder)
    write_card(folder, manifest, final=final)
    return manifest
