"""The export folder a GGUF bake starts from, and the check that a GGUF is that export's base model."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bakery.gguf.facts import HF_TO_GGUF
from bakery.gguf.read import GGUFError, GGUFShape, dequantize, tensor_map
from bakery.io.manifest import Manifest
from bakery.vectors.artifact import VectorArtifact
from bakery.vectors.load import load_vector

# final norm of the export, first name found wins; llama.cpp calls it output_norm.weight
_FINAL_NORMS = ("model.norm.weight", "model.language_model.norm.weight")
NORM_RTOL = 2e-2  # bf16 storage of an F32 GGUF norm, or a Q4-dequantized source, stays well inside


@dataclass
class ExportInfo:
    """An export folder written by ``bakery bake``: its manifest, config and vector files."""

    folder: Path
    manifest: Manifest
    config: dict[str, Any]
    vectors: dict[str, VectorArtifact]  # vector_file (relative) -> artifact

    def term_row(self, vector_file: str, layer: int) -> np.ndarray:
        return self.vectors[vector_file].vectors[layer].float().numpy().astype(np.float32)


def read_export(folder: str | Path) -> ExportInfo:
    folder = Path(folder)
    if not folder.is_dir():
        raise GGUFError(f"export folder not found: {folder} (write one with `bakery bake`)")
    manifest = Manifest.load(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise GGUFError(f"{folder} has no config.json: it is not a complete bakery export")
    config = json.loads(cfg_path.read_text())
    vectors: dict[str, VectorArtifact] = {}
    for t in manifest.terms:
        if t.vector_file not in vectors:
            path = folder / t.vector_file
            if not path.is_file():
                raise GGUFError(f"{folder}'s bakery.json names the vector file {t.vector_file}, which is "
                                "missing: restore it (it is part of the export)")
            vectors[t.vector_file] = load_vector(path)
    return ExportInfo(folder, manifest, config, vectors)


def _cfg(config: dict[str, Any], key: str) -> Any:
    if key in config:
        return config[key]
    return (config.get("text_config") or {}).get(key)


def _final_norm(export: Path) -> np.ndarray | None:
    from bakery.io.checkpoint import CheckpointReader

    try:
        reader = CheckpointReader(export)
    except Exception:  # a damaged export is reported by the steps that need its weights
        return None
    for name in _FINAL_NORMS:
        if name in reader:
            return reader.get(name).float().numpy()
    return None


def check_base(info: ExportInfo, reader, shape: GGUFShape, gguf_path: Path) -> list[str]:
    """Refuse a GGUF that is not the export's base model; return what was checked."""
    cfg = info.config
    what = f"{gguf_path.name} is not the base model of the export {info.folder}"
    expected = HF_TO_GGUF.get(str(_cfg(cfg, "model_type")))
    if expected is not None and expected != shape.arch:
        raise GGUFError(f"{what}: the export is a {_cfg(cfg, 'model_type')} model (llama.cpp "
                        f"architecture {expected}), the GGUF is {shape.arch}")
    for key, got, name in (("num_hidden_layers", shape.n_layer, "block_count"),
                           ("hidden_size", shape.n_embd, "embedding_length"),
                           ("vocab_size", shape.n_vocab, "vocabulary size")):
        want = _cfg(cfg, key)
        if want is not None and got is not None and int(want) != int(got):
            raise GGUFError(f"{what}: its {name} is {got}, the export's {key} is {want}")
    for vf, art in info.vectors.items():
        if art.hidden_size != shape.n_embd or art.num_layers != shape.n_layer:
            raise GGUFError(
                f"the vector {vf} has {art.num_layers + 1} rows x {art.hidden_size}, but the GGUF has "
                f"{shape.n_layer} blocks x n_embd {shape.n_embd} (a vector needs {shape.n_layer + 1} "
                f"rows x {shape.n_embd}): it was extracted from another model")
    checked = [f"architecture {shape.arch}, {shape.n_layer} blocks, n_embd {shape.n_embd}, "
               f"vocabulary {shape.n_vocab}"]
    norm = tensor_map(reader).get("output_norm.weight")
    ours = _final_norm(info.folder)
    if norm is not None and ours is not None:
        theirs = dequantize(norm).reshape(-1)
        if theirs.shape != ours.reshape(-1).shape:
            raise GGUFError(f"{what}: output_norm.weight has {theirs.size} values, the export's final "
                            f"norm {ours.size}")
        diff = float(np.abs(theirs - ours.reshape(-1)).max())
        scale = float(np.abs(ours).max()) or 1.0
        if diff > NORM_RTOL * scale:
            raise GGUFError(f"{what}: its output_norm.weight differs from the export's final norm "
                            f"(max |difference| {diff:.4g} against values up to {scale:.4g}). Use the "
                            "GGUF of the model the export was baked from")
        checked.append(f"output_norm.weight equals the export's final norm (max |diff| {diff:.2g})")
    return checked
