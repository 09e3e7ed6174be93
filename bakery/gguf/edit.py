"""The GGUF-native edits of a bake: added F32 biases (bias) and projected weights (ortho).

Layer numbering: artifact row ``L`` is added at the output of block ``L-1`` (llama.cpp's
``blk.{L-1}``); the attn-out site of the bias baker is after the attention of block ``L``
(``blk.{L}.attn_output.bias``), as in the safetensors export.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np

from bakery.gguf.facts import CONVERT_HINT, GGUFArch
from bakery.gguf.read import GGUFError, GGUFShape, NewTensor, dequantize, tensor_map
from bakery.gguf.source import ExportInfo

_ROWS = 4096  # rows of the token embedding dequantized, projected and quantized at a time


@dataclass
class GGUFEdit:
    """What to change in the source GGUF, and what it means."""

    kind: str  # "bias" | "ortho"
    replace: dict[str, NewTensor] = field(default_factory=dict)
    add_after: dict[str, list[tuple[str, NewTensor]]] = field(default_factory=dict)
    terms: list[dict[str, Any]] = field(default_factory=list)
    edited: list[str] = field(default_factory=list)
    added: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)


def refuse_unsupported(info: ExportInfo) -> str:
    """The GGUF-native edit kind of the export ("bias" or "ortho"), or a clear refusal."""
    m = info.manifest
    if m.method == "bias" and m.route != "rank1":
        return "bias"
    if m.method == "ortho":
        return "ortho"
    what = "a rank-one update of the down-projection" if m.route == "rank1" else f"{m.method} weights"
    raise GGUFError(
        f"the export {info.folder} is a {m.method}{' --route rank1' if m.route == 'rank1' else ''} bake "
        f"({what}): it has no edit that can be applied to a GGUF as it is (its weights differ from the "
        f"base model's everywhere the bake touched them). {CONVERT_HINT[0].upper() + CONVERT_HINT[1:]}, "
        "then quantize the result with llama.cpp's llama-quantize if you want a smaller file")


def _bias_tensors(deltas: dict[int, np.ndarray], site: str, facts: GGUFArch, shape: GGUFShape,
                  tensors: dict[str, Any], arch: str, edit: GGUFEdit) -> dict[int, str]:
    stem = facts.bias.get(site)
    if stem is None:
        have = ", ".join(facts.bias) or "none"
        raise GGUFError(f"llama.cpp's {arch} graph has no optional bias at site {site} (sites with one: "
                        f"{have}); {CONVERT_HINT}")
    if site == "resid-out" and facts.dense_only_bias and shape.n_expert:
        raise GGUFError(f"this {arch} GGUF has {shape.n_expert} experts per block, and llama.cpp's "
                        f"{arch} graph loads no ffn_down bias for expert blocks; bake --site attn-out, "
                        f"or {CONVERT_HINT}")
    names: dict[int, str] = {}
    for block, delta in sorted(deltas.items()):
        if not 0 <= block < shape.n_layer:
            raise GGUFError(f"the bake needs block {block}, but the GGUF has blocks 0..{shape.n_layer - 1}")
        name = f"blk.{block}.{stem}.bias"
        if name in tensors:
            raise GGUFError(f"the GGUF already has {name}: bakery adds biases only where none exists "
                            "(is it already baked?). Start from the unedited GGUF")
        weight = f"blk.{block}.{stem}.weight"
        if weight not in tensors:
            raise GGUFError(f"the GGUF has no {weight}, so it has no place for {name}")
        edit.add_after.setdefault(weight, []).append((name, NewTensor(delta.astype(np.float32), _f32())))
        edit.added.append(name)
        names[block] = name
    return names


def _f32():
    import gguf

    return gguf.GGMLQuantizationType.F32


def plan_bias(info: ExportInfo, reader, shape: GGUFShape, facts: GGUFArch) -> GGUFEdit:
    """``coef * v[L]`` summed per block, as new F32 biases; every other tensor untouched."""
    m = info.manifest
    site = m.site or "resid-out"
    edit = GGUFEdit("bias")
    deltas: dict[int, np.ndarray] = {}
    for t in m.terms:
        if t.coef is None:
            raise GGUFError(f"{info.folder}'s bakery.json has a bias term without coef: a damaged manifest")
        block = t.layer if site == "attn-out" else t.layer - 1
        deltas[block] = deltas.get(block, 0) + np.float32(t.coef) * info.term_row(t.vector_file, t.layer)
    names = _bias_tensors(deltas, site, facts, shape, tensor_map(reader), shape.arch, edit)
    for t in m.terms:
        block = t.layer if site == "attn-out" else t.layer - 1
        edit.terms.append({"layer": t.layer, "block": block, "coef": t.coef, "vector_file": t.vector_file,
                           "trait": t.trait, "site": site, "tensor": names[block]})
    return edit


@lru_cache(maxsize=None)
def can_quantize(qtype) -> bool:
    """Whether the gguf package can write ``qtype`` (probed on one block of zeros)."""
    import gguf

    block = gguf.GGML_QUANT_SIZES[qtype][0]
    try:
        gguf.quants.quantize(np.zeros((1, max(block, 256)), dtype=np.float32), qtype)
        return True
    except (NotImplementedError, gguf.quants.QuantError):
        return False


def requantize(W: np.ndarray, qtype) -> np.ndarray:
    import gguf

    return np.asarray(gguf.quants.quantize(np.ascontiguousarray(W, dtype=np.float32), qtype))


def project_last(W: np.ndarray, r: np.ndarray) -> np.ndarray:
    """``W - (W r) r^T`` along the last axis (embedding rows, biases), float32."""
    return W - np.multiply.outer(W @ r, r).astype(np.float32)


def project_first(W: np.ndarray, r: np.ndarray) -> np.ndarray:
    """``W - r (r^T W)`` along axis -2 (a weight ``[n_embd, in]``, or ``[experts, n_embd, in]``)."""
    c = np.einsum("h,...hi->...i", r, W)
    return W - r[:, None] * c[..., None, :]


def _unit(v: np.ndarray, what: str) -> np.ndarray:
    n = float(np.linalg.norm(v))
    if n == 0:
        raise GGUFError(f"{what} is all zeros: there is no direction to ablate")
    return (v / n).astype(np.float32)


def _ortho_dirs(info: ExportInfo, n: int) -> tuple[dict[int, np.ndarray], np.ndarray, dict[str, Any]]:
    m = info.manifest
    t = m.terms[0]
    abl = m.ablation or {}
    blocks = abl.get("blocks", "all")
    block_list = list(range(n)) if blocks in (None, "all") else [int(b) for b in blocks]
    if abl.get("per_layer"):
        dirs = {i: _unit(info.term_row(t.vector_file, i + 1), f"row {i + 1} of the vector") for i in block_list}
        embed = _unit(info.term_row(t.vector_file, 1), "row 1 of the vector")
    else:
        r = _unit(info.term_row(t.vector_file, t.layer), f"row {t.layer} of the vector")
        dirs = {i: r for i in block_list}
        embed = r
    return dirs, embed, abl


def _check_types(names: list[str], tensors: dict[str, Any]) -> None:
    bad = sorted({tensors[n].tensor_type.name for n in names if not can_quantize(tensors[n].tensor_type)})
    if bad:
        raise GGUFError(
            f"the gguf package cannot quantize back to {', '.join(bad)} (the type of tensors the ortho "
            f"edit changes), so the edited GGUF cannot keep its quantization. Alternatives: {CONVERT_HINT}, "
            f"then quantize with llama.cpp's llama-quantize; or start from a GGUF whose edited tensors are "
            f"in a type it writes ({', '.join(_writable())})")


def _writable() -> list[str]:
    import gguf

    return [q.name for q in gguf.GGMLQuantizationType if q in gguf.GGML_QUANT_SIZES and can_quantize(q)]


FEEDBACK_ROUNDS = 3  # error-feedback passes against the rounding left along r (Q4_1: 32% -> 7%)


def _cast(X: np.ndarray, qtype) -> tuple[np.ndarray, np.ndarray]:
    """``X`` in ``qtype`` (what is written) and that, read back as float32."""
    import gguf

    if qtype == gguf.GGMLQuantizationType.F32:
        return X.astype(np.float32), X.astype(np.float32)
    if qtype == gguf.GGMLQuantizationType.F16:
        data = X.astype(np.float16)
        return data, data.astype(np.float32)
    data = requantize(X, qtype)
    return data, np.asarray(gguf.quants.dequantize(data, qtype), dtype=np.float32)


def _store(P: np.ndarray, qtype, r: np.ndarray, axis: str) -> tuple[np.ndarray, np.ndarray]:
    """The projected ``P`` stored in ``qtype``: rounding puts some of ``r`` back, so the part of
    the stored tensor along ``r`` is fed back (subtracted before rounding again) while that shrinks.
    Returns what is written and its float32 read-back."""
    data, back = _cast(P, qtype)
    if qtype == _f32():
        return data, back
    left = np.linalg.norm(_along(back, r, axis))
    X = P
    for _ in range(FEEDBACK_ROUNDS if left > 0 else 0):
        c = _along(back, r, axis)
        X = X - (np.multiply.outer(c, r) if axis in ("last", "rows") else r[:, None] * c[..., None, :])
        d2, b2 = _cast(X.astype(np.float32), qtype)
        now = np.linalg.norm(_along(b2, r, axis))
        if now >= left:
            break
        data, back, left = d2, b2, now
    return data, back


def _edit_embedding(t, r: np.ndarray) -> tuple[np.ndarray, float]:
    """token_embd rows with ``r`` projected out, a block of rows at a time."""
    import gguf

    parts, before, after = [], 0.0, 0.0
    for a in range(0, t.data.shape[0], _ROWS):
        W = np.asarray(gguf.quants.dequantize(np.asarray(t.data[a:a + _ROWS]), t.tensor_type), dtype=np.float32)
        data, back = _store(project_last(W, r), t.tensor_type, r, "rows")
        before += float(np.square(W @ r).sum())
        after += float(np.square(back @ r).sum())
        parts.append(data)
    return np.concatenate(parts, axis=0), (after / max(before, 1e-30)) ** 0.5


def plan_ortho(info: ExportInfo, reader, shape: GGUFShape, facts: GGUFArch) -> GGUFEdit:
    """Project ``r`` out of every residual writer: dequantize, project in float32, quantize back."""
    if not facts.writers:
        raise GGUFError(f"no ortho edit of a {shape.arch} GGUF: {facts.no_ortho_reason}; {CONVERT_HINT}")
    tensors = tensor_map(reader)
    dirs, r_embed, abl = _ortho_dirs(info, shape.n_layer)
    edit = GGUFEdit("ortho")
    targets: list[tuple[str, np.ndarray, str]] = []  # (name, r, axis)
    for i, r in dirs.items():
        for stem in facts.writers:
            for kind in ("weight", "bias"):
                name = f"blk.{i}.{stem}.{kind}"
                if name in tensors:
                    targets.append((name, r, "last" if kind == "bias" else "first"))
    embeddings = abl.get("embeddings", "ablate")
    if embeddings == "ablate":
        targets.append(("token_embd.weight", r_embed, "rows"))
    _check_types([n for n, _, _ in targets], tensors)
    worst = 0.0
    for name, r, axis in targets:
        t = tensors[name]
        if axis == "rows":
            data, w = _edit_embedding(t, r)
        else:
            W = dequantize(t)
            P = project_last(W, r) if axis == "last" else project_first(W, r)
            data, back = _store(P, t.tensor_type, r, axis)
            before = float(np.linalg.norm(_along(W, r, axis)))
            w = float(np.linalg.norm(_along(back, r, axis))) / max(before, 1e-30)
        worst = max(worst, w)
        edit.replace[name] = NewTensor(data, t.tensor_type)
        edit.edited.append(name)
    if embeddings == "ablate" and "output.weight" not in tensors:
        t = tensors["token_embd.weight"]
        edit.add_after.setdefault("token_embd.weight", []).append(("output.weight", NewTensor(t.data, t.tensor_type)))
        edit.added.append("output.weight")
        edit.notes.append("tied embeddings untied: token_embd.weight is ablated and output.weight is added "
                          "as a byte copy of the original token_embd.weight (llama.cpp uses output.weight "
                          "when present, token_embd.weight otherwise), so the output head is unchanged")
    elif embeddings == "keep":
        edit.notes.append("embeddings left untouched, as in the export (embeddings=keep)")
    edit.stats["max_residual_fraction"] = worst
    edit.notes.append(f"after storing in the source types, the component along r left in an edited tensor "
                      f"is at most {worst:.3g} of its norm before the edit (0: exactly removed; a "
                      "quantized type keeps its rounding noise along r)")
    if worst > 0.1:
        edit.notes.append(f"warning: this GGUF's quantization is too coarse to remove the direction well "
                          f"(up to {worst:.0%} of it is left as rounding noise). For a closer ablation "
                          "start from an F16/BF16/Q8_0 GGUF, or convert the export: `bakery gguf EXPORT -o "
                          "OUT --outtype q8_0`")
    t0 = info.manifest.terms[0]
    edit.terms.append({"layer": t0.layer, "block": t0.layer - 1, "coef": None, "vector_file": t0.vector_file,
                       "trait": t0.trait, "site": "ablation", "tensor": None,
                       "blocks": sorted(dirs), "embeddings": embeddings, "per_layer": bool(abl.get("per_layer"))})
    add = abl.get("add")
    if add:
        r = _unit(info.term_row(t0.vector_file, t0.layer), "v")
        names = _bias_tensors({t0.layer - 1: np.float32(add) * r}, "resid-out", facts, shape, tensors,
                              shape.arch, edit)
        edit.terms.append({"layer": t0.layer, "block": t0.layer - 1, "coef": float(add),
                           "vector_file": t0.vector_file, "trait": t0.trait, "site": "resid-out",
                           "tensor": names[t0.layer - 1]})
        edit.notes.append(f"affine edit: {float(add):g} * r re-added as {names[t0.layer - 1]}")
    return edit


def _along(W: np.ndarray, r: np.ndarray, axis: str) -> np.ndarray:
    """The component of ``W`` along ``r`` on its hidden axis."""
    return W @ r if axis in ("last", "rows") else np.einsum("h,...hi->...i", r, W)
