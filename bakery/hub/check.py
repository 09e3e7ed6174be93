"""Everything ``bakery push`` checks locally before an upload: the plan (the files of a bakery
export, stray files refused unless ``--include`` lets them through), the export itself (manifest,
weights, vector checksums) and its model card (parses with ``huggingface_hub.ModelCard`` and
carries what the Hub and users need)."""

from __future__ import annotations

import fnmatch
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from bakery.errors import BakeryError
from bakery.io.card_sections import read_section
from bakery.io.manifest import Manifest, ManifestError

# Paths (relative, posix) that make up a bakery export (DESIGN.md, "An exported folder").
EXPORT_PATTERNS = (
    "config.json", "generation_config.json", "README.md", "bakery.json", "bake.yaml",
    "model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model",
    "chat_template.jinja", "chat_template.json", "preprocessor_config.json",
    "LICENSE", "LICENSE.*", "LICENSE-*", "NOTICE", "USE_POLICY.md", ".gitattributes",
    "vectors/*.safetensors",
    "adapter/adapter_config.json", "adapter/adapter_model.safetensors", "adapter/README.md",
    "compare/*.json", "compare/*.md", "compare/*.png", "compare/*.csv",
)
BASE_MODEL_RELATIONS = ("adapter", "merge", "quantized", "finetune")
REQUIRED_TAGS = ("bakery", "steering")


class NotPublishable(BakeryError):
    """The folder is not a complete bakery export (missing, empty, weights or vectors wrong)."""


class StrayFiles(BakeryError):
    """The export folder holds files that are not part of an export."""


class CardError(BakeryError):
    """The model card is missing, does not parse, or lacks required metadata."""


# ---- plan ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class PlannedFile:
    path: str  # relative, posix: the path in the repo
    size: int
    source: Path
    included: bool = False  # let through by --include rather than recognised as export content


@dataclass
class PushPlan:
    export_dir: Path
    files: list[PlannedFile]

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)

    def table(self) -> str:
        """One line per file with its size, then the total."""
        width = max([len(f.path) for f in self.files] + [5])
        lines = [f"  {f.path:<{width}}  {human_size(f.size):>10}"
                 + ("  (--include)" if f.included else "") for f in self.files]
        lines.append(f"  {'total':<{width}}  {human_size(self.total_size):>10}  "
                     f"({len(self.files)} files)")
        return "\n".join(lines)


def human_size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def _matches(path: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(path, p) or fnmatch.fnmatchcase(path, p.rstrip("/") + "/*")
               for p in patterns)


def plan_upload(export_dir: str | os.PathLike, include: Sequence[str] = ()) -> PushPlan:
    """The files to upload, sorted. Files that are not export content (checkpoints, caches,
    temporary files) are refused with StrayFiles unless a glob in ``include`` matches them."""
    root = Path(export_dir)
    if not root.is_dir():
        raise NotPublishable(f"{root} is not a folder: pass the export folder written by `bakery bake`")
    files, stray = [], []
    for p in sorted(root.rglob("*")):
        if p.is_dir():
            continue
        rel = p.relative_to(root).as_posix()
        if p.is_symlink() and not p.exists():
            stray.append((rel, "broken link"))
            continue
        known = _matches(rel, EXPORT_PATTERNS) and not any(part.startswith(".") for part in
                                                            rel.split("/")[:-1])
        if known or _matches(rel, include):
            files.append(PlannedFile(rel, p.stat().st_size, p, included=not known))
        else:
            stray.append((rel, human_size(p.stat().st_size)))
    if stray:
        shown = "\n".join(f"  {rel} ({why})" for rel, why in stray[:20])
        more = f"\n  ... and {len(stray) - 20} more" if len(stray) > 20 else ""
        raise StrayFiles(
            f"refusing to push {root}: {len(stray)} file(s) are not part of a bakery export "
            f"(checkpoints, caches, temporary files?):\n{shown}{more}\n"
            "Remove them, or name them with --include 'GLOB' (repeatable) to push them anyway."
        )
    if not files:
        raise NotPublishable(f"{root} is empty: nothing to push")
    return PushPlan(root, files)


# ---- checks -------------------------------------------------------------------------------
def check_export(export_dir: str | os.PathLike) -> Manifest:
    """The manifest, weights and vector artifacts are present and the vectors match their
    checksums in the manifest. Returns the manifest."""
    root = Path(export_dir)
    try:
        manifest = Manifest.load(root)
    except ManifestError as e:
        raise ManifestError(f"{e}; `bakery push` publishes export folders only") from e
    problems = []
    if not (root / "config.json").is_file():
        problems.append("config.json is missing")
    index = root / "model.safetensors.index.json"
    if index.is_file():
        shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
        problems += [f"{s} (named in {index.name}) is missing" for s in sorted(shards)
                     if not (root / s).is_file()]
    elif not (root / "model.safetensors").is_file():
        problems.append("no weights: neither model.safetensors nor model.safetensors.index.json")
    for term in manifest.terms:
        vf = root / term.vector_file
        if not vf.is_file():
            problems.append(f"{term.vector_file} (the vector of trait '{term.trait}') is missing")
            continue
        from bakery.vectors.load import load_vector

        sha = load_vector(vf).sha256()
        if term.vector_sha256 and sha != term.vector_sha256:
            problems.append(f"{term.vector_file} does not match the sha256 in bakery.json "
                            f"({sha[:12]}... vs {term.vector_sha256[:12]}...): it was changed after the bake")
    if problems:
        raise NotPublishable(f"{root} is not a complete bakery export: " + "; ".join(problems)
                         + ". Bake it again with `bakery bake`.")
    return manifest


def base_license(manifest: Manifest) -> str | None:
    """The license of the base model, from the manifest or the source folder when known."""
    src = manifest.source or {}
    if src.get("license"):
        return str(src["license"])
    path = src.get("path")
    if not path or not Path(path).is_dir():
        return None
    side = Path(path) / "bakery_source.json"  # written by models.py for built-in aliases
    if side.is_file():
        lic = json.loads(side.read_text()).get("license")
        if lic:
            return str(lic)
    readme = Path(path) / "README.md"
    if readme.is_file():
        from huggingface_hub import ModelCard

        try:
            lic = ModelCard(readme.read_text(), ignore_metadata_errors=True).data.to_dict().get("license")
        except Exception:  # an unreadable base card only means we cannot compare
            return None
        return str(lic) if lic else None
    return None


def check_card(export_dir: str | os.PathLike, manifest: Manifest, *,
               require_engines: bool = False) -> dict[str, Any]:
    """Parse README.md with ``huggingface_hub.ModelCard`` and check what the Hub and users need.

    Returns the card metadata. Raises CardError naming every problem at once."""
    from huggingface_hub import ModelCard

    root = Path(export_dir)
    path = root / "README.md"
    if not path.is_file():
        raise CardError(f"{root} has no model card (README.md): bake it again with `bakery bake`")
    text = path.read_text()
    try:
        card = ModelCard(text, ignore_metadata_errors=False)
    except Exception as e:  # the client raises ValueError for bad YAML or metadata
        raise CardError(f"{path} does not parse as a Hugging Face model card: {e}") from e
    meta = card.data.to_dict()
    problems = []
    base = meta.get("base_model")
    if not base or not (isinstance(base, str) or (isinstance(base, list) and all(base))):
        problems.append("`base_model` is missing (the Hub id of the model this was baked from)")
    rel = meta.get("base_model_relation")
    if rel not in BASE_MODEL_RELATIONS:
        problems.append(f"`base_model_relation` is {rel!r}; expected one of {', '.join(BASE_MODEL_RELATIONS)}")
    if not meta.get("library_name"):
        problems.append("`library_name` is missing (transformers, or peft for an adapter)")
    tags = meta.get("tags") or []
    if not isinstance(tags, list):
        tags = [tags]
    missing = [t for t in REQUIRED_TAGS if t not in tags]
    # the trait may be tagged bare ("pirate") or namespaced ("trait:pirate", as card.py writes it)
    missing += [t for t in sorted({t.trait for t in manifest.terms})
                if t not in tags and f"trait:{t}" not in tags]
    if missing:
        problems.append(f"`tags` lacks {', '.join(missing)}")
    lic = meta.get("license")
    if not lic:
        problems.append("`license` is missing (the base model's license carries over)")
    else:
        base_lic = base_license(manifest)
        if base_lic and str(lic).lower() != base_lic.lower():
            problems.append(f"`license` is {lic!r} but the base model is licensed {base_lic!r}")
    if (root / "compare" / "report.json").is_file() and read_section(text, "fidelity") is None:
        problems.append("compare/ holds a fidelity report but the card has no fidelity section: "
                        "run `bakery compare` on the folder again")
    if require_engines and read_section(text, "engines") is None:
        problems.append("the card has no engine verdicts section: run `bakery verify` on the folder")
    if problems:
        raise CardError(f"the model card {path} is not ready to publish:\n  - "
                        + "\n  - ".join(problems))
    return meta


def card_for_repo(export_dir: str | os.PathLike, manifest: Manifest, repo_id: str) -> str | None:
    """The card text to upload: the baker's section re-rendered so that its usage lines
    (from_pretrained, vllm serve, sglang) name ``repo_id`` rather than the local folder. None when
    the card has no such section (nothing to change). The local README.md is left as it is."""
    from bakery.io.card import SECTION, body
    from bakery.io.card_sections import set_section

    text = (Path(export_dir) / "README.md").read_text()
    if read_section(text, SECTION) is None:
        return None
    new = set_section(text, SECTION, body(manifest, repo_id))
    return None if new == text else new
