"""Importers for the vectors that write-ups and reference code publish as ``.pt`` files.

- :func:`import_pt`: one ``.pt`` file, a full ``[num_layers+1, hidden]`` table (as it is), a
  single ``[hidden]`` direction placed at row ``layer`` of a zero table sized by the model, or a
  dict of some layers' rows.
- :func:`read_checkpoint_folder` / :func:`write_checkpoint_folder` / :func:`load_checkpoint_folder`:
  a folder with one ``.pt`` per training checkpoint (``step1000.pt``, ...), one artifact each,
  written as one output folder with a ``checkpoints.json`` index.

The layouts a ``.pt`` may hold are those of :mod:`bakery.vectors.pt`; anything else is refused.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Callable

import torch

from bakery.arch import cfg_get, hidden_size_of, num_layers_of
from bakery.io.digest import file_sha256
from bakery.io.folders import CHECKPOINT_VECTORS, atomic_folder
from bakery.models import config_hash
from bakery.naming import describe_layer
from bakery.vectors.artifact import VectorArtifact, VectorError
from bakery.vectors.load import load_vector
from bakery.vectors.pt import PtLayoutError, PtVectors, load_pt, parse_pt

INDEX = CHECKPOINT_VECTORS.marker  # checkpoints.json
INDEX_FORMAT = "bakery per-checkpoint vectors"
PT_SUFFIXES = (".pt", ".pth")
STEP_RE = re.compile(r"step[_\-]?(\d+)", re.IGNORECASE)
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


def model_facts(config: Any, model_id: str | None = None) -> dict[str, Any]:
    """What an imported artifact records about the model it was placed for."""
    cfg = config if isinstance(config, dict) else config.to_dict()
    return {"model": model_id or cfg_get(config, "_name_or_path") or cfg_get(config, "model_type"),
            "model_config_hash": config_hash(cfg), "model_type": cfg_get(config, "model_type"),
            "num_hidden_layers": num_layers_of(config), "hidden_size": hidden_size_of(config)}


def _model_name(config: Any, model_id: str | None) -> str:
    return str(model_id or cfg_get(config, "_name_or_path") or cfg_get(config, "model_type"))


def _check_hidden(size: int, config: Any, model_id: str | None, where: str) -> None:
    h = hidden_size_of(config)
    if size != h:
        raise VectorError(
            f"{where} has hidden size {size} but the model {_model_name(config, model_id)} has hidden "
            f"size {h}: the vector comes from another model. Pass the --model it was extracted from.")


def _check_row(layer: int, n: int, where: str) -> None:
    if layer == n:
        raise VectorError(
            f"{where}: layer {layer} is the last row, taken after the final norm; it is not a residual "
            f"direction. Choose a layer in 1..{n - 1} (row L = output of block L-1).")
    if not 1 <= layer < n:
        raise VectorError(
            f"{where}: layer {layer} is out of range for a model with {n} layers: choose a layer in "
            f"1..{n - 1} ({describe_layer(1)} .. {describe_layer(n - 1)})")


def place(got: PtVectors, *, where: str, config: Any | None, model_id: str | None = None,
          layer: int | None = None) -> tuple[VectorArtifact, dict[str, Any]]:
    """A table, a direction or a per-layer dict as an artifact sized for the model (``config``);
    also returns the metadata that says how it was placed."""
    if got.kind == "named":
        raise VectorError(f"internal error: {where} is a dict of named entries")
    if got.kind == "table":
        if layer is not None:
            raise VectorError(
                f"{where} is a full table with a row per layer; --layer only places a single [hidden] "
                "direction. Import it without --layer and pick the layer when you steer or bake.")
        art = VectorArtifact(got.tensor)
        if config is not None:
            art.check_model(config)
        return art, {"layout": "table"}
    if config is None:
        what = "a single direction" if got.kind == "direction" else "a dict of per-layer vectors"
        raise VectorError(f"{where} holds {what}: say which model it belongs to with --model, so "
                          "that bakery can size the table (num_hidden_layers + 1 rows)")
    n = num_layers_of(config)
    _check_hidden(got.hidden_size, config, model_id, where)
    table = torch.zeros(n + 1, hidden_size_of(config))
    if got.kind == "direction":
        if layer is None:
            raise VectorError(
                f"{where} holds a single direction of shape [{got.hidden_size}] and does not say its "
                f"layer: pass --layer L (row L = output of block L-1, 1..{n - 1}), the layer it was "
                "extracted at (e.g. --layer 22 for the Qwen3.5 write-up's persona_dir.pt)")
        _check_row(layer, n, where)
        table[layer] = got.tensor
        facts = {"layout": "single direction", "layer": layer, "layer_text": describe_layer(layer),
                 "norm": round(float(got.tensor.norm()), 6)}
        return VectorArtifact(table), facts
    if layer is not None:
        raise VectorError(f"{where} holds vectors for layers {sorted(got.layers)}, each at its own "
                          "row; --layer only places a single [hidden] direction. Import it without --layer.")
    for L, v in got.layers.items():
        if not 0 <= L <= n:
            raise VectorError(f"{where}: layer key {L} is out of range for a model with {n} layers "
                              f"(rows 0..{n})")
        table[L] = v
    return VectorArtifact(table), {"layout": "per-layer dict", "layers_set": sorted(got.layers)}


def import_pt(path: str | os.PathLike, *, config: Any | None = None, model_id: str | None = None,
              layer: int | None = None, trait: str | None = None) -> VectorArtifact:
    """One ``.pt`` file as an artifact: a full table as it is (checked against ``config`` when
    given), a single direction at row ``layer`` (``config`` and ``layer`` required), or a dict of
    layer rows (``config`` required); other rows are zero."""
    path = Path(path)
    if not path.is_file():
        raise VectorError(f"vector file not found: {path}")
    got = parse_pt(load_pt(path), str(path))
    art, how = place(got, where=str(path), config=config, model_id=model_id, layer=layer)
    origin = "persona-vectors .pt" if how["layout"] == "table" else f"{how['layout']} .pt"
    art.meta = {"trait": trait or path.stem, "imported_from": origin,
                "source": {"file": path.name, "sha256": file_sha256(path)}, "import": how}
    if how["layout"] == "single direction":
        art.meta["single_direction"] = True
        art.meta["recommended_layer"] = layer
    if config is not None:
        art.meta.update(model_facts(config, model_id))
    return art


# ---- a folder of per-checkpoint .pt files ---------------------------------------------------------
def _step(name: str) -> int | None:
    m = STEP_RE.search(name)
    return int(m.group(1)) if m else None


def scan_checkpoint_folder(folder: Path) -> tuple[list[Path], list[str]]:
    """The ``.pt`` files of a per-checkpoint folder, and the other names it holds (ignored)."""
    if not folder.is_dir():
        raise VectorError(f"{folder} is not a folder; a per-checkpoint import reads a folder of .pt files")
    files, ignored = [], []
    for p in sorted(folder.iterdir()):
        if p.name.startswith("."):
            continue
        if p.is_dir():
            if any(q.suffix.lower() in PT_SUFFIXES for q in p.rglob("*")):
                raise VectorError(
                    f"{folder} has .pt files in the subfolder {p.name}/: bakery reads one flat folder, "
                    "one .pt per checkpoint. Import each subfolder on its own.")
            ignored.append(p.name + "/")
        elif p.suffix.lower() in PT_SUFFIXES:
            files.append(p)
        else:
            ignored.append(p.name)
    if not files:
        raise VectorError(f"{folder} holds no .pt files: a per-checkpoint folder has one .pt per "
                          "training checkpoint (step1000.pt, step2000.pt, ...)")
    return files, ignored


def read_checkpoint_folder(folder: str | os.PathLike, *, config: Any | None = None,
                           model_id: str | None = None, layer: int | None = None,
                           trait: str | None = None) -> dict[str, VectorArtifact]:
    """``{name: artifact}`` for a folder of per-checkpoint ``.pt`` files, sorted by step.

    The checkpoint is the file's stem (also recorded as the revision, with the step number when the
    stem has ``step<N>``). A file holding a dict of named entries gives one artifact per entry,
    named ``<stem>.<entry>``. Every artifact must have the same shape."""
    folder = Path(folder)
    files, _ = scan_checkpoint_folder(folder)
    files.sort(key=lambda p: (_step(p.stem) is None, _step(p.stem) or 0, p.stem))
    out: dict[str, VectorArtifact] = {}
    for path in files:
        got = parse_pt(load_pt(path), str(path), named=True)
        entries = got.named if got.kind == "named" else {None: got}
        sha = file_sha256(path)
        for key, entry in entries.items():
            name = path.stem if key is None else f"{path.stem}.{key}"
            if not SAFE_NAME.match(name):
                raise VectorError(f"{path}: the name '{name}' cannot name a file (letters, digits, "
                                  "'.', '-' and '_' only); rename the file or its dict key")
            if name in out:
                raise VectorError(f"{path}: two checkpoints are both named '{name}'")
            where = str(path) if key is None else f"{path}[{key!r}]"
            art, how = place(entry, where=where, config=config, model_id=model_id, layer=layer)
            art.meta = {"trait": trait or (key if key is not None else folder.name),
                        "imported_from": "per-checkpoint .pt folder", "checkpoint": path.stem,
                        "revision": path.stem, "step": _step(path.stem), "entry": key,
                        "source": {"file": path.name, "sha256": sha}, "import": how}
            if how["layout"] == "single direction":
                art.meta["single_direction"] = True
                art.meta["recommended_layer"] = layer
            if config is not None:
                art.meta.update(model_facts(config, model_id))
            first = next(iter(out.values()), None)
            if first is not None and first.vectors.shape != art.vectors.shape:
                raise VectorError(
                    f"{where} has shape {tuple(art.vectors.shape)} but {next(iter(out))} has "
                    f"{tuple(first.vectors.shape)}: every checkpoint of one folder must come from the "
                    "same model shape")
            out[name] = art
    return out


def write_checkpoint_folder(arts: dict[str, VectorArtifact], out: str | os.PathLike, *,
                            source: str | os.PathLike | None = None, ignored: list[str] | None = None,
                            force: bool = False) -> Path:
    """Write ``{name: artifact}`` as ``OUT/<name>.safetensors`` plus the ``checkpoints.json`` index,
    atomically (a previous per-checkpoint folder is replaced only with ``force``)."""
    rows = []
    with atomic_folder(out, kind=CHECKPOINT_VECTORS, force=force) as tmp:
        for name, art in arts.items():
            art.save(tmp / f"{name}.safetensors")
            m = art.meta
            rows.append({"name": name, "file": f"{name}.safetensors", "checkpoint": m.get("checkpoint"),
                         "revision": m.get("revision"), "step": m.get("step"), "entry": m.get("entry"),
                         "trait": m.get("trait"), "source": m.get("source"), "sha256": art.sha256(),
                         "shape": list(art.vectors.shape)})
        index = {"format": INDEX_FORMAT, "source": str(source) if source else None,
                 "model": next(iter(arts.values())).meta.get("model") if arts else None,
                 "checkpoints": rows, "ignored": ignored or []}
        (tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return Path(out)


def import_checkpoint_folder(folder: str | os.PathLike, out: str | os.PathLike, *,
                             config: Any | None = None, model_id: str | None = None,
                             layer: int | None = None, trait: str | None = None, force: bool = False,
                             log: Callable[[str], None] | None = None) -> dict[str, VectorArtifact]:
    """Read a per-checkpoint folder and write it as one output folder; returns ``{name: artifact}``."""
    from bakery.io.folders import check_output

    check_output(out, kind=CHECKPOINT_VECTORS, force=force)
    _, ignored = scan_checkpoint_folder(Path(folder))
    arts = read_checkpoint_folder(folder, config=config, model_id=model_id, layer=layer, trait=trait)
    if ignored and log:
        log(f"ignored (not .pt): {', '.join(ignored)}")
    write_checkpoint_folder(arts, out, source=folder, ignored=ignored, force=force)
    return arts


def load_checkpoint_folder(folder: str | os.PathLike) -> dict[str, VectorArtifact]:
    """``{name: artifact}`` from a folder written by :func:`write_checkpoint_folder`, in index order."""
    folder = Path(folder)
    try:
        index = json.loads((folder / INDEX).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise VectorError(f"{folder} has no readable {INDEX}: not a per-checkpoint vectors folder "
                          f"({e})") from e
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT:
        raise VectorError(f"{folder / INDEX} is not a bakery per-checkpoint index")
    return {row["name"]: load_vector(folder / row["file"]) for row in index["checkpoints"]}


__all__ = ["CHECKPOINT_VECTORS", "PtLayoutError", "import_checkpoint_folder", "import_pt",
           "load_checkpoint_folder", "model_facts", "place", "read_checkpoint_folder",
           "write_checkpoint_folder"]
