"""The one export path: every baker's folder is assembled here. The baker writes the weights and
``config.json`` (:class:`~bakery.bakers.base.Weights`); this module adds the source's other files
(tokenizer, generation config, ...), ``vectors/<trait>.safetensors``, ``bake.yaml``,
``bakery.json`` and the model card, in a temporary folder renamed into place at the end."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable

import torch

from bakery.bakers.base import BakeFacts, BakePlan, BakeRequest, Weights
from bakery.io.checkpoint import DTYPES, INDEX_FILE, OutTensor, ShardedWriter
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


def write_overlay(folder: Path, source_dir: Path, config: dict[str, Any], trained_dir: Path, *,
                  rename: Callable[[str], str] = lambda n: n, progress: bool = False,
                  max_shard_bytes: int | None = None) -> list[str]:
    """The source checkpoint, streamed, with each tensor of the checkpoint in ``trained_dir``
    (``rename`` maps its names to the source model's) in place of the source tensor it differs
    from. Every other tensor (a wrapper's vision tower, what training left alone) is copied byte
    for byte, and ``config.json`` is the source's ``config``. Returns the replaced names."""
    from bakery.arch import spec_for
    from bakery.io.checkpoint import CheckpointError, CheckpointReader

    src, new = CheckpointReader(source_dir), CheckpointReader(trained_dir)
    plan = BakePlan(reader=src, config=dict(config))
    replaced = []
    for n, info in new.tensors.items():
        target = next((t for t in (plan.names.find(n), plan.names.find(rename(n))) if t is not None), None)
        if target is None or src.tensors[target].shape != info.shape:
            raise CheckpointError(
                f"the trained weights hold {n} {tuple(info.shape)}, which the source checkpoint "
                f"{source_dir} has no tensor of that shape for: its layout is not what transformers "
                f"writes for a {spec_for(config).model_type} model (a bug in bakery: please report it)")
        t = new.get(n).to(src.tensors[target].torch_dtype).contiguous()
        if not torch.equal(t.view(-1).view(torch.uint8), src.get(target).contiguous().view(-1).view(torch.uint8)):
            plan.edit(target, lambda x, n=n: new.get(n))
            replaced.append(target)
    write_plan(plan, folder, progress=progress, max_shard_bytes=max_shard_bytes)
    return sorted(replaced)


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


def write_plan(plan: BakePlan, folder: Path, *, progress: bool, max_shard_bytes: int | None) -> None:
    """A closed-form bake's weights, streamed tensor by tensor, and its config."""
    from tqdm import tqdm

    tensors = output_tensors(plan)
    writer = ShardedWriter(folder, **({"max_shard_bytes": max_shard_bytes} if max_shard_bytes else {}))
    with tqdm(total=sum(t.nbytes for t in tensors), unit="B", unit_scale=True, desc="writing weights",
              disable=not progress, leave=False) as bar:
        writer.write(tensors, progress=bar.update)
    (folder / "config.json").write_text(json.dumps(plan.config, indent=2) + "\n")


def write_export(req: BakeRequest, weights: Weights, *, force: bool = False, progress: bool = True,
                 max_shard_bytes: int | None = None, folder: Path | None = None) -> Path:
    """Write the export of ``req`` to ``req.out`` (or ``folder``) atomically and return it."""
    from bakery.bakers import get_baker
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
