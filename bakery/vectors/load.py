"""Any vector file in, a :class:`~bakery.vectors.artifact.VectorArtifact` out: bakery
``.safetensors``, the persona-vectors reference's ``.pt`` (:mod:`bakery.vectors.pt`) and llama.cpp
control-vector GGUF."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from bakery.vectors.artifact import VectorArtifact, VectorError, read_safetensors
from bakery.vectors.pt import load_pt, parse_pt


def _read_reference_pt(path: Path) -> VectorArtifact:
    """A full ``[num_layers+1, hidden]`` table from a ``.pt`` file (see :mod:`bakery.vectors.pt`);
    a single direction or a per-layer dict needs the model and is refused with what to run."""
    got = parse_pt(load_pt(path), str(path))
    if got.kind == "table":
        return VectorArtifact(got.tensor, {"trait": path.stem, "imported_from": "persona-vectors .pt"})
    what = (f"a single direction of shape [{got.hidden_size}] with no layer" if got.kind == "direction"
            else f"vectors for layers {sorted(got.layers)} only, not a full table")
    raise VectorError(
        f"{path} holds {what}: bakery needs the layer and the model to place it. Import it first: "
        f"bakery vectors import {path} OUT.safetensors --model MODEL"
        + (" --layer L" if got.kind == "direction" else ""))


def _read_control_vector(path: Path, num_layers: int | None) -> VectorArtifact:
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:
        raise VectorError(f"cannot read {path} as GGUF: {e}") from e
    directions: dict[int, torch.Tensor] = {}
    for t in reader.tensors:
        if t.name.startswith("direction."):
            directions[int(t.name.split(".", 1)[1])] = torch.tensor(t.data.copy()).float().flatten()
    if not directions:
        raise VectorError(f"{path} holds no 'direction.N' tensors: not a llama.cpp control vector")
    hidden = next(iter(directions.values())).numel()
    if num_layers is None:
        field_ = reader.fields.get("controlvector.layer_count")
        num_layers = max(directions) + 2
        if field_ is not None:
            num_layers = max(num_layers, int(field_.parts[field_.data[0]][0]) + 2)
    out = torch.zeros(num_layers + 1, hidden)
    for block, vec in directions.items():
        if block + 1 >= num_layers:  # would land on the post-norm row
            continue
        out[block + 1] = vec
    return VectorArtifact(out, {"trait": path.stem, "imported_from": "llama.cpp control vector"})


def load_vector(path: str | os.PathLike, *, num_layers: int | None = None) -> VectorArtifact:
    """Load a vector artifact from ``.safetensors`` (bakery), ``.pt`` (persona-vectors reference)
    or ``.gguf`` (llama.cpp control vector; ``num_layers`` sizes the result)."""
    path = Path(path)
    if not path.is_file():
        raise VectorError(f"vector file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return read_safetensors(path)
    if suffix in (".pt", ".pth"):
        return _read_reference_pt(path)
    if suffix == ".gguf":
        return _read_control_vector(path, num_layers)
    raise VectorError(
        f"unknown vector file type '{suffix}' for {path}: use .safetensors (bakery), "
        ".pt (persona-vectors reference) or .gguf (llama.cpp control vector)"
    )
