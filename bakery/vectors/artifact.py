"""The vector artifact: one ``[num_hidden_layers + 1, hidden_size]`` float32 tensor per trait.

Row ``L`` is ``hidden_states[L]`` of a transformers forward pass: row 0 the embedding output, row
``L >= 1`` the output of block ``L-1``, the last row taken after the final norm (never baked).
Files: bakery ``.safetensors`` (tensor ``vectors`` + JSON metadata under ``bakery``), the
persona-vectors reference ``.pt`` (raw tensor; the ``.pt`` layouts are in :mod:`bakery.vectors.pt`,
single directions and per-checkpoint folders in :mod:`bakery.vectors.imports`), and llama.cpp
control-vector GGUF.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bakery import __version__
from bakery.arch import cfg_get, hidden_size_of, num_layers_of
from bakery.errors import BakeryError
from bakery.naming import describe_layer

META_KEY = "bakery"
VARIANTS = ("response_avg", "prompt_avg", "prompt_last")


class VectorError(BakeryError):
    """A vector file that cannot be read, or that does not fit the model or the request."""


def unit(v: torch.Tensor, what: str = "the vector") -> torch.Tensor:
    """``v / |v|`` in float32; a zero vector has no direction and is refused (``what`` names it)."""
    v = v.detach().float()
    norm = v.norm()
    if norm == 0:
        raise VectorError(f"{what} is all zeros: it has no direction")
    return v / norm


@dataclass
class VectorArtifact:
    vectors: torch.Tensor  # [num_layers + 1, hidden] float32
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.vectors.ndim != 2:
            raise VectorError(
                f"a vector artifact holds a 2-D tensor [num_layers+1, hidden]; got shape "
                f"{tuple(self.vectors.shape)}"
            )
        self.vectors = self.vectors.detach().to(torch.float32).cpu().contiguous()
        if not torch.isfinite(self.vectors).all():
            raise VectorError("the vector tensor contains NaN or infinite values")

    @property
    def num_layers(self) -> int:
        return self.vectors.shape[0] - 1

    @property
    def hidden_size(self) -> int:
        return self.vectors.shape[1]

    @property
    def trait(self) -> str:
        return str(self.meta.get("trait", "unknown"))

    def row(self, layer: int) -> torch.Tensor:
        if not 0 <= layer <= self.num_layers:
            raise VectorError(
                f"layer {layer} is out of range: this artifact has rows 0..{self.num_layers}"
            )
        return self.vectors[layer]

    def norms(self) -> list[float]:
        return self.vectors.norm(dim=-1).tolist()

    def sha256(self) -> str:
        return hashlib.sha256(self.vectors.numpy().tobytes()).hexdigest()

    # ---- validation ----------------------------------------------------------------------
    def check_model(self, config: Any) -> None:
        """Refuse a vector whose shape does not match the model (both shapes named)."""
        n, h = num_layers_of(config), hidden_size_of(config)
        name = cfg_get(config, "_name_or_path") or cfg_get(config, "model_type")
        if self.hidden_size != h:
            raise VectorError(
                f"vector hidden size {self.hidden_size} does not match the model's hidden size {h} "
                f"({name}): this vector was extracted from another model"
                + (f" ({self.meta['model']})" if self.meta.get("model") else "")
            )
        if self.num_layers != n:
            raise VectorError(
                f"vector has {self.num_layers + 1} rows (for {self.num_layers} layers) but the model "
                f"has {n} layers, so it needs {n + 1} rows ({name}): extracted from another model?"
            )

    def check_layer(self, layer: int, *, for_bake: bool = False) -> None:
        """Steerable rows are 1..num_layers-1; the last row is post-final-norm, never baked."""
        last = self.num_layers
        if layer == last:
            if for_bake:
                raise VectorError(
                    f"layer {layer} is the last row, taken after the final norm: it is not a "
                    f"residual direction and cannot be baked. Choose a layer in 1..{last - 1}."
                )
            return
        if not 1 <= layer < last:
            raise VectorError(
                f"layer {layer} is out of range: steerable layers are 1..{last - 1} "
                f"({describe_layer(1)} .. {describe_layer(last - 1)})"
            )

    # ---- files ---------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write the bakery ``.safetensors`` format atomically."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"bakery_version": __version__, **self.meta}
        meta.setdefault("per_layer_norm", [round(x, 6) for x in self.norms()])
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(fd)
        try:
            save_file({"vectors": self.vectors}, tmp, metadata={META_KEY: json.dumps(meta)})
            os.chmod(tmp, 0o644)  # mkstemp creates 0600; an artifact is meant to be shared
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return path

    def to_control_vector(self, path: str | os.PathLike, *, model_hint: str = "llama") -> Path:
        """Export as a llama.cpp control-vector GGUF.

        llama.cpp names a direction after the 0-based block whose output it is added to and has
        no ``direction.0``; so row ``L`` becomes ``direction.{L-1}`` for rows 2..num_layers-1.
        Row 1 (block 0) and the post-norm last row have no llama.cpp equivalent and are left out.
        """
        import gguf

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        writer = gguf.GGUFWriter(str(tmp), "controlvector")
        writer.add_string("controlvector.model_hint", model_hint)
        rows = range(2, self.num_layers)
        writer.add_uint32("controlvector.layer_count", len(rows))
        for layer in rows:
            writer.add_tensor(f"direction.{layer - 1}", self.vectors[layer].numpy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
        return path


def read_safetensors(path: Path) -> VectorArtifact:
    """A bakery vector artifact file (tensor ``vectors``, JSON metadata under ``bakery``)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta_raw = (f.metadata() or {}).get(META_KEY)
            keys = list(f.keys())
            if "vectors" not in keys:
                raise VectorError(
                    f"{path} is a safetensors file but holds no 'vectors' tensor (found: "
                    f"{', '.join(keys) or 'nothing'}); is it a vector artifact?"
                )
            tensor = f.get_tensor("vectors")
    except VectorError:
        raise
    except Exception as e:  # safetensors raises its own error types for truncated headers
        raise VectorError(f"cannot read {path}: the file is corrupt or not safetensors ({e})") from e
    meta = json.loads(meta_raw) if meta_raw else {}
    return VectorArtifact(tensor, meta)


def cosine_by_layer(a: VectorArtifact, b: VectorArtifact) -> list[float]:
    """Per-layer cosine similarity of two artifacts with the same shape."""
    if a.vectors.shape != b.vectors.shape:
        raise VectorError(
            f"cannot compare vectors of shapes {tuple(a.vectors.shape)} and {tuple(b.vectors.shape)}"
        )
    return torch.nn.functional.cosine_similarity(a.vectors, b.vectors, dim=-1, eps=1e-12).tolist()
