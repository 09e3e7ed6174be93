"""Reading a GGUF model file and writing a copy of it with a few tensors replaced or added.

The copy keeps every metadata key with its own value type, in the source order, the source's
data alignment, and every untouched tensor as its raw bytes (quantized blocks included).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bakery.errors import BakeryError


class GGUFError(BakeryError):
    """A GGUF that bakery cannot read, edit or convert as asked; the message says why and what to do."""


@dataclass(frozen=True)
class NewTensor:
    """A tensor to write: ``data`` in numpy (row-major) order; quantized types as their bytes."""

    data: np.ndarray
    qtype: Any  # gguf.GGMLQuantizationType


def open_gguf(path: str | os.PathLike):
    """A :class:`gguf.GGUFReader` over ``path`` (memory-mapped), or a clear error."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise GGUFError(f"GGUF file not found: {path}")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise GGUFError(f"{path} is not a GGUF file (no GGUF magic at its start)")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # the reader raises plain ValueErrors on damaged files
        raise GGUFError(f"cannot read {path} as GGUF: {e}") from e
    if getattr(reader, "byte_order", "I") == "S":
        raise GGUFError(f"{path} is a big-endian GGUF; bakery edits little-endian GGUFs only")
    return reader


def field(reader, key: str, default: Any = None) -> Any:
    """The value of metadata ``key`` (a scalar, a string or a list), or ``default``."""
    f = reader.fields.get(key)
    if f is None or not f.types:
        return default
    return f.contents()


def architecture(reader) -> str:
    arch = field(reader, "general.architecture")
    if not isinstance(arch, str):
        raise GGUFError("the GGUF has no general.architecture key: it is not a llama.cpp model file")
    return arch


@dataclass(frozen=True)
class GGUFShape:
    """What identifies a GGUF model's shape: architecture, blocks, width, vocabulary, experts."""

    arch: str
    n_layer: int
    n_embd: int
    n_vocab: int | None
    n_expert: int


def shape_of(reader) -> GGUFShape:
    arch = architecture(reader)
    n_layer = field(reader, f"{arch}.block_count")
    n_embd = field(reader, f"{arch}.embedding_length")
    if n_layer is None or n_embd is None:
        raise GGUFError(f"the GGUF lacks {arch}.block_count or {arch}.embedding_length: not a model "
                        "file bakery can edit")
    vocab = field(reader, f"{arch}.vocab_size")
    if vocab is None:
        tokens = reader.fields.get("tokenizer.ggml.tokens")
        vocab = len(tokens.data) if tokens is not None else None
    return GGUFShape(arch, int(n_layer), int(n_embd), None if vocab is None else int(vocab),
                     int(field(reader, f"{arch}.expert_count", 0) or 0))


def file_type_name(reader) -> str:
    """``general.file_type`` as llama.cpp names it (e.g. MOSTLY_Q4_1), or the tensor types used."""
    import gguf

    ft = field(reader, "general.file_type")
    if ft is not None:
        try:
            return gguf.LlamaFileType(int(ft)).name
        except ValueError:
            return f"file_type {ft}"
    kinds = sorted({t.tensor_type.name for t in reader.tensors})
    return "+".join(kinds)


def tensor_map(reader) -> dict[str, Any]:
    return {t.name: t for t in reader.tensors}


def dequantize(t) -> np.ndarray:
    """A reader tensor as float32 in numpy order (``[..., ne0]``)."""
    import gguf

    try:
        out = gguf.quants.dequantize(t.data, t.tensor_type)
    except NotImplementedError as e:
        raise GGUFError(f"the gguf package cannot dequantize {t.name} ({t.tensor_type.name}): {e}") from e
    return np.asarray(out, dtype=np.float32)


def write_copy(reader, path: str | os.PathLike, *, replace: dict[str, NewTensor] | None = None,
               add_after: dict[str, list[tuple[str, NewTensor]]] | None = None,
               append: list[tuple[str, NewTensor]] | None = None) -> Path:
    """Write ``reader``'s GGUF to ``path`` with ``replace``d tensors, tensors added right after a
    named one (``add_after``) and ``append``ed at the end; everything else is copied as it is."""
    import gguf

    replace = replace or {}
    add_after = add_after or {}
    names = {t.name for t in reader.tensors}
    unknown = [n for n in [*replace, *add_after] if n not in names]
    if unknown:
        raise GGUFError(f"internal error: tensors {unknown} are not in the source GGUF")
    writer = gguf.GGUFWriter(str(path), architecture(reader))
    writer.kv_data[0].clear()  # the constructor adds general.architecture; the source's keys follow
    for key, f in reader.fields.items():
        if key.startswith("GGUF."):  # header values (version, counts), not metadata
            continue
        vtype = f.types[0]
        sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        value = f.contents()
        if vtype == gguf.GGUFValueType.ARRAY and len(value) == 0:
            raise GGUFError(f"metadata key {key} is an empty array, which the gguf package cannot "
                            "write; remove it from the source GGUF (gguf_new_metadata.py) first")
        writer.add_key_value(key, value, vtype, sub_type=sub)
    alignment = field(reader, "general.alignment")
    if alignment is not None:
        writer.data_alignment = int(alignment)

    def put(name: str, data: np.ndarray, qtype) -> None:
        writer.add_tensor(name, data, raw_dtype=qtype)

    for t in reader.tensors:
        new = replace.get(t.name)
        put(t.name, new.data if new else t.data, new.qtype if new else t.tensor_type)
        for name, extra in add_after.get(t.name, []):
            put(name, extra.data, extra.qtype)
    for name, extra in append or []:
        put(name, extra.data, extra.qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)
