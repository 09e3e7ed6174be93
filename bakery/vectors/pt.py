"""``.pt`` vector files: what bakery reads from them, always with ``torch.load(weights_only=True)``.

A ``.pt`` file holds one of these, and nothing else:

- a tensor ``[num_layers + 1, hidden]``: a full table (the persona-vectors reference);
- a tensor ``[hidden]`` (or ``[1, hidden]``): a single direction with no layer (the Qwen3.5
  write-up's ``persona_dir.pt``); the layer must be given when it is imported;
- a dict ``{"vectors" | "vector" | "direction": tensor}``: the same, wrapped;
- a dict ``{layer: tensor [hidden]}`` whose keys are all layer numbers (``12``, ``"12"``,
  ``"layer_12"``, ``"layer.12"``, ``"layer-12"``, ``"L12"``): some rows of a table;
- a dict ``{name: one of the above}`` whose keys are all other names (a trait or a variant per
  entry), read only where several artifacts may come out (the per-checkpoint folder import).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bakery.vectors.artifact import VectorError

WRAPPER_KEYS = ("vectors", "vector", "direction")
LAYER_KEY = re.compile(r"^(?:layer[_.\-]?|l)?(\d+)$", re.IGNORECASE)
LAYOUTS = ("a tensor [num_layers+1, hidden], a tensor [hidden] (one direction, imported with "
           "--layer), a dict {'vectors': tensor}, a dict {layer number: tensor [hidden]}, or (in a "
           "per-checkpoint folder) a dict {name: one of these}")


class PtLayoutError(VectorError):
    """A ``.pt`` file that cannot be read, or whose content is not a layout bakery accepts."""


@dataclass
class PtVectors:
    """What one ``.pt`` file (or one entry of its dict) holds."""

    kind: str  # "table", "direction", "layers" or "named"
    tensor: torch.Tensor | None = None  # table [rows, hidden] or direction [hidden]
    layers: dict[int, torch.Tensor] = field(default_factory=dict)  # kind "layers"
    named: dict[str, "PtVectors"] = field(default_factory=dict)  # kind "named"

    @property
    def hidden_size(self) -> int:
        if self.kind == "named":
            return next(iter(self.named.values())).hidden_size
        t = self.tensor if self.tensor is not None else next(iter(self.layers.values()))
        return int(t.shape[-1])


def load_pt(path: str | Path) -> Any:
    """``torch.load`` with ``weights_only=True`` on the CPU; any failure is a clear error."""
    path = Path(path)
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # pickled code, truncated files, not a torch file at all
        raise PtLayoutError(
            f"cannot read {path} as a .pt vector file (loaded with weights_only=True, which refuses "
            f"pickled code): {e}") from e


def _tensor(t: Any, where: str) -> PtVectors:
    if t.ndim == 2 and t.shape[0] == 1:
        t = t[0]
    if t.ndim == 1:
        return PtVectors("direction", tensor=t.detach().float())
    if t.ndim == 2:
        return PtVectors("table", tensor=t.detach().float())
    raise PtLayoutError(f"{where} holds a tensor of shape {tuple(t.shape)}; bakery reads {LAYOUTS}")


def layer_number(key: Any) -> int | None:
    """The layer of a dict key (``12``, ``"layer_12"``, ...), or None for any other name."""
    if isinstance(key, int) and not isinstance(key, bool):
        return key
    m = LAYER_KEY.match(str(key).strip())
    return int(m.group(1)) if m else None


def parse_pt(obj: Any, where: str, *, named: bool = False) -> PtVectors:
    """Classify what ``torch.load`` returned; refuse anything outside the module's layouts.

    ``named`` allows a dict of named entries (one artifact each)."""
    if isinstance(obj, torch.Tensor):
        return _tensor(obj, where)
    if not isinstance(obj, dict) or not obj:
        got = "an empty dict" if isinstance(obj, dict) else type(obj).__name__
        raise PtLayoutError(f"{where} holds {got}; bakery reads {LAYOUTS}")
    keys = list(obj)
    shown = ", ".join(map(repr, keys[:8])) + (", ..." if len(keys) > 8 else "")
    wrapped = [k for k in keys if k in WRAPPER_KEYS]
    if wrapped:
        if len(keys) != 1:
            raise PtLayoutError(f"{where} holds a dict with keys {shown}: a '{wrapped[0]}' entry must be "
                                "the only one (bakery would not know which tensor to take)")
        return parse_pt(obj[wrapped[0]], f"{where}['{wrapped[0]}']", named=False)
    not_tensors = [k for k in keys if not isinstance(obj[k], torch.Tensor)]
    if not_tensors:
        raise PtLayoutError(f"{where}: entry {not_tensors[0]!r} is a {type(obj[not_tensors[0]]).__name__}, "
                            f"not a tensor; bakery reads {LAYOUTS}")
    layers = {k: layer_number(k) for k in keys}
    if all(v is not None for v in layers.values()):
        rows: dict[int, torch.Tensor] = {}
        for k, L in layers.items():
            t = obj[k].reshape(-1) if obj[k].ndim == 2 and obj[k].shape[0] == 1 else obj[k]
            if t.ndim != 1:
                raise PtLayoutError(f"{where}: layer entry {k!r} has shape {tuple(obj[k].shape)}; a dict "
                                    "keyed by layer must hold one [hidden] vector per layer")
            if L in rows:
                raise PtLayoutError(f"{where}: layer {L} appears twice (keys {shown})")
            rows[L] = t.detach().float()
        sizes = {int(t.numel()) for t in rows.values()}
        if len(sizes) != 1:
            raise PtLayoutError(f"{where}: the layer entries have different sizes {sorted(sizes)}")
        return PtVectors("layers", layers=dict(sorted(rows.items())))
    if any(v is not None for v in layers.values()):
        raise PtLayoutError(f"{where} mixes layer numbers and other names in its keys ({shown}); "
                            "keys must be all layer numbers or all names")
    if not named:
        raise PtLayoutError(
            f"{where} holds several named tensors ({shown}), so it is not one vector; import a "
            "folder of such files as per-checkpoint vectors (one artifact per name), or save one "
            "tensor per file")
    out = {str(k): parse_pt(obj[k], f"{where}[{k!r}]") for k in keys}
    return PtVectors("named", named=out)
