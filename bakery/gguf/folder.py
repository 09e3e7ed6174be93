"""``bakery gguf``: a folder with one GGUF of a bake, its manifest, card and ollama Modelfile."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import numpy as np

from bakery import __version__
from bakery.gguf.convert import LLAMACPP_PIN, convert
from bakery.gguf.edit import GGUFEdit, plan_bias, plan_ortho, refuse_unsupported
from bakery.gguf.facts import CONVERT_HINT, arch_facts
from bakery.io.digest import file_sha256
from bakery.gguf.read import (GGUFError, dequantize, file_type_name, open_gguf, shape_of,
                              tensor_map, write_copy)
from bakery.gguf.source import ExportInfo, check_base, read_export
from bakery.io.folders import GGUF_EXPORT, atomic_folder, check_output

MANIFEST = "bakery-gguf.json"


def _command(export: Path, out: Path, from_gguf: Path | None, outtype: str | None) -> str:
    args = ["bakery", "gguf", str(export), "-o", str(out)]
    if from_gguf is not None:
        args += ["--from-gguf", str(from_gguf)]
    if outtype:
        args += ["--outtype", outtype]
    return shlex.join(args)


def _plan(info: ExportInfo, src: Path) -> tuple[Any, GGUFEdit, list[str]]:
    kind = refuse_unsupported(info)
    reader = open_gguf(src)
    shape = shape_of(reader)
    facts = arch_facts(shape.arch)
    if facts is None:
        raise GGUFError(f"bakery has no llama.cpp facts for GGUF architecture {shape.arch!r} (it knows "
                        "llama, qwen2, qwen3, qwen3moe, qwen35, gemma2, gemma3, olmo2) and does not guess "
                        f"where its graph adds a bias; {CONVERT_HINT}")
    if kind == "bias" and not facts.bias:
        raise GGUFError(f"no bias bake of a {shape.arch} GGUF: {facts.no_bias_reason}. Alternatives: "
                        f"{CONVERT_HINT} (if the export's architecture converts), or an ortho bake")
    checked = check_base(info, reader, shape, src)
    edit = plan_bias(info, reader, shape, facts) if kind == "bias" else plan_ortho(info, reader, shape, facts)
    return reader, edit, checked


def _convert_terms(info: ExportInfo) -> list[dict[str, Any]]:
    m = info.manifest
    site = m.site or "resid-out"
    return [{"layer": t.layer, "block": t.layer if site == "attn-out" else t.layer - 1, "coef": t.coef,
             "vector_file": t.vector_file, "trait": t.trait, "site": site} for t in m.terms]


def _export_bias(info: ExportInfo, block: int, site: str) -> np.ndarray | None:
    """The bias the export holds for ``block`` at ``site`` (a native bias includes its original value)."""
    from bakery.arch import spec_for
    from bakery.io.checkpoint import CheckpointReader

    try:
        spec = spec_for(info.config)
        name = f"{spec.block(block)}.{spec.routes[site].tensor}"
        reader = CheckpointReader(info.folder)
    except Exception:  # no facts for it: compare with coef * v instead
        return None
    return reader.get(name).float().numpy().reshape(-1) if name in reader else None


def _check_converted(info: ExportInfo, path: Path) -> list[str]:
    """A bias bake must keep its biases through the converter: find them and compare the values."""
    m = info.manifest
    if m.method != "bias" or m.route == "rank1":
        return []
    site = m.site or "resid-out"
    tensors = tensor_map(open_gguf(path))
    stem = "attn_output" if site == "attn-out" else "ffn_down"
    notes, sums = [], {}
    for t in m.terms:
        block = t.layer if site == "attn-out" else t.layer - 1
        sums[block] = sums.get(block, 0) + np.float32(t.coef) * info.term_row(t.vector_file, t.layer)
    for block, delta in sums.items():
        name = f"blk.{block}.{stem}.bias"
        if name not in tensors:
            raise GGUFError(f"llama.cpp's converter dropped the baked bias: {path.name} has no {name}. "
                            "This GGUF would run unsteered; nothing was written")
        want = _export_bias(info, block, site)
        want = delta if want is None else want
        got = dequantize(tensors[name]).reshape(-1)
        err = float(np.abs(got - want).max()) / max(float(np.abs(want).max()), 1e-30)
        if err > 1e-2:
            raise GGUFError(f"{name} in the converted GGUF differs from the export's bias (relative {err:.3g})")
        notes.append(f"{name} present after conversion (relative difference to the export's bias {err:.2g})")
    return notes


TRANSFORMERS_DROPS = ("transformers' GGUF loader (from_pretrained(..., gguf_file=...)) ignores added biases: "
                      "with transformers 5.24 mlp_bias stays off and the logits equal the unedited GGUF's. "
                      "Check this file in llama.cpp (bakery verify --engine llama.cpp), not there")


def _card(d: dict[str, Any]) -> str:
    name = d["gguf"]
    src = d["source_gguf"]
    made = (f"`{src['path']}` (sha256 `{src['sha256'][:16]}...`), edited in place ({d['edit']})"
            if src else f"the export converted by llama.cpp's own `convert_hf_to_gguf.py` ({LLAMACPP_PIN})")
    terms = "\n".join(f"- layer {t['layer']} = output of block {t['layer'] - 1}; llama.cpp block "
                      f"`blk.{t['block']}`; coef {t['coef']}; vector `{t['vector_file']}`" for t in d["terms"])
    notes = "\n".join(f"- {n}" for n in d["notes"])
    return f"""---
tags: [bakery, gguf, llama.cpp, steering]
---
# {name}

A GGUF of the bakery bake `{d['export']}` (method `{d['method']}`, route `{d['route']}`), for
llama.cpp, ollama and everything built on them. The steering is in the weights: no control
vector, no flag.

- made from: {made}
- file type / quantization: `{d['file_type']}`
- the bake is {"exact by construction against runtime steering (up to the rounding of the stored types and of llama.cpp's quantized activations)" if d['exact'] else "approximate (measure it with bakery verify --engine llama.cpp)"}
- bakery {d['bakery_version']}; redo it with `{d['command']}`

## The bake
{terms}

{notes}

## Run it
```
llama-cli -m {name} -cnv
llama-server -m {name}
```
ollama: `ollama create baked -f Modelfile` then `ollama run baked` (the Modelfile is in this folder).
"""


def gguf_bake(export: str | Path, out: str | Path, *, from_gguf: str | Path | None = None,
              outtype: str | None = None, force: bool = False) -> Path:
    """Write OUT: one GGUF of the bake ``export`` (edited from ``from_gguf``, or converted)."""
    export, out = Path(export), Path(out)
    src = Path(from_gguf) if from_gguf is not None else None
    if src is not None and src.resolve().is_relative_to(out.resolve()):
        raise GGUFError(f"the source GGUF {src} is inside the output folder {out}: bakery never writes "
                        "over its source. Choose another -o")
    check_output(out, kind=GGUF_EXPORT, force=force, source=export)
    if src is not None and outtype is not None:
        raise GGUFError("--outtype is for the conversion path; with --from-gguf the GGUF keeps its own "
                        "tensor types (quantize it with llama.cpp's llama-quantize afterwards if you wish)")
    info = read_export(export)
    m = info.manifest
    command = _command(export, out, src, outtype)
    if src is not None:
        reader, edit, checked = _plan(info, src)
        name = f"{src.stem}.{export.name}.gguf"
        d = {"edit": edit.kind, "terms": edit.terms, "edited_tensors": edit.edited,
             "added_tensors": edit.added, "stats": edit.stats,
             "notes": checked + edit.notes + ([TRANSFORMERS_DROPS] if any(n.endswith(".bias") for n in edit.added) else []),
             "file_type": file_type_name(reader),
             "source_gguf": {"path": str(src.resolve()), "sha256": file_sha256(src)}}
    else:
        name = f"{export.name}.{outtype or 'auto'}.gguf"
        d = {"edit": "convert", "terms": _convert_terms(info), "edited_tensors": [], "added_tensors": [],
             "notes": [], "stats": {}, "source_gguf": None}
    with atomic_folder(out, kind=GGUF_EXPORT, force=force, source=export) as tmp:
        path = tmp / name
        if src is not None:
            write_copy(reader, path, replace=edit.replace, add_after=edit.add_after)
        else:
            d["conversion"] = convert(export.resolve(), path, outtype or "auto")
            d["notes"] += _check_converted(info, path)
            if any(".bias" in n for n in d["notes"]):
                d["notes"].append(TRANSFORMERS_DROPS)
            d["file_type"] = file_type_name(open_gguf(path))
        d = {"gguf": name, "export": str(export.resolve()), "method": m.method, "route": m.route,
             "site": m.site,
             "exact": bool(m.exact) and d["stats"].get("max_residual_fraction", 0.0) < 0.02, "export_terms": [t.to_dict() for t in m.terms], **d,
             "bakery_version": __version__, "command": command}
        (tmp / MANIFEST).write_text(json.dumps(d, indent=2) + "\n")
        (tmp / "README.md").write_text(_card(d))
        (tmp / "Modelfile").write_text(f"# ollama: ollama create NAME -f Modelfile\nFROM ./{name}\n")
    return out
