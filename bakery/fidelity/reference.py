"""What a bake stands for: the runtime edit (steering terms and/or an ablation) it is measured against.

A bake of several terms (``bakery bake`` with a recipe of several traits or layers) stands for the
same multi-term runtime steering: every term's ``coef * v[L]`` added at its own layer, each from
its own vector (:class:`bakery.steering.hooks.Steering` with one :class:`SteeringTerm` per term).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bakery.errors import BakeryError
from bakery.arch import num_layers_of, spec_for
from bakery.fidelity.metrics import ContextFactory
from bakery.io.manifest import Manifest
from bakery.models import config_hash, read_config, resolve_model
from bakery.steering.hooks import Ablation, Steering, SteeringTerm, blocks_of
from bakery.steering.sites import AttnOutSteering, attn_out_target
from bakery.naming import describe_layer
from bakery.vectors.artifact import VectorArtifact, VectorError
from bakery.vectors.load import load_vector


class CompareError(BakeryError):
    """A comparison that cannot run as asked (bad export, settings or prompts)."""


@dataclass
class RefTerm:
    """One steering term of a reference: ``coef * vector.row(layer)``."""

    layer: int
    coef: float
    vector: VectorArtifact

    def delta(self) -> torch.Tensor:
        return self.coef * self.vector.row(self.layer).float()


@dataclass
class Reference:
    """The runtime edit a bake is measured against: steering terms and/or an ablation.

    ``terms`` holds :class:`RefTerm` objects; a ``(layer, coef)`` pair is a term of ``vector``."""

    vector: VectorArtifact  # the main vector: the ablated direction, or the first term's
    layer: int  # the row used for the projection metric
    terms: list = field(default_factory=list)
    positions: str = "all"
    ablation: dict[str, Any] | None = None  # ortho: layer, blocks, embeddings, per_layer, add
    site: str = "resid-out"  # resid-out: output of block L-1; attn-out: after the attention of block L

    def __post_init__(self) -> None:
        self.terms = [t if isinstance(t, RefTerm) else RefTerm(int(t[0]), t[1], self.vector) for t in self.terms]

    @property
    def probe_layer(self) -> int:
        """hidden_states row where the edit shows: the output of block L for the attn-out site."""
        return self.layer + 1 if self.site == "attn-out" else self.layer

    @property
    def coef(self) -> float:
        return self.terms[0].coef if self.terms else 0.0

    @property
    def kind(self) -> str:
        if self.ablation:
            return "ablation+steering" if self.ablation.get("add") else "ablation"
        return "steering"

    @property
    def multi_vector(self) -> bool:
        return len({t.vector.sha256() for t in self.terms}) > 1

    def unit(self) -> torch.Tensor:
        v = self.vector.row(self.layer).float()
        return v / v.norm().clamp_min(1e-12)

    def _term_text(self, t: RefTerm) -> str:
        where = (f"after the attention of block {t.layer}, v[{t.layer}]" if self.site == "attn-out"
                 else describe_layer(t.layer))
        trait = f"{t.vector.trait or 'vector'} " if self.multi_vector else ""
        return f"{trait}{where}, coef {t.coef:g}"

    def describe(self) -> str:
        if self.ablation:
            s = f"runtime ablation of v[{self.layer}] on every residual write"
            if self.ablation.get("embeddings") == "keep":
                s += " except the embedding output"
            if self.ablation.get("add"):
                s += f", then {self.ablation['add']:g} * r added at {describe_layer(self.layer)}"
            return s
        parts = "; ".join(self._term_text(t) for t in self.terms)
        return f"runtime steering ({parts}), positions {self.positions}"

    def key(self) -> tuple:
        return (self.vector.sha256(), self.layer,
                tuple((t.layer, t.coef, t.vector.sha256()) for t in self.terms), self.positions, self.site,
                json.dumps(self.ablation, sort_keys=True, default=str))

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "layer": self.layer, "block": self.layer - 1,
                "layer_text": describe_layer(self.layer), "coef": self.coef,
                "terms": [{"layer": t.layer, "coef": t.coef, "trait": t.vector.trait,
                           "vector_sha256": t.vector.sha256()} for t in self.terms],
                "probe_layer": self.probe_layer, "positions": self.positions,
                "ablation": self.ablation, "site": self.site, "vector_sha256": self.vector.sha256(),
                "trait": self.vector.trait, "description": self.describe()}

    def context(self, model) -> ContextFactory:
        """``prompt_len -> context manager`` applying this edit to ``model`` (the base)."""

        def make(prompt_len: int | None):
            stack = contextlib.ExitStack()
            if self.ablation:
                stack.enter_context(self._ablation(model))
                add = self.ablation.get("add")
                if add:
                    stack.enter_context(Steering(model, [SteeringTerm(self.layer, self.unit(), float(add))]))
            elif self.terms and self.site == "attn-out":
                stack.enter_context(AttnOutSteering(model, [(t.layer, t.delta()) for t in self.terms]))
            elif self.terms:
                terms = [SteeringTerm(t.layer, t.vector.row(t.layer), t.coef) for t in self.terms]
                stack.enter_context(Steering(model, terms, positions=self.positions, prompt_len=prompt_len))
            return stack

        return make

    def _ablation(self, model) -> Ablation:
        a = self.ablation or {}
        blocks = a.get("blocks")
        blocks = None if blocks in (None, "all") else list(blocks)
        embeddings = a.get("embeddings", "ablate") != "keep"
        if a.get("per_layer"):
            n = len(blocks_of(model))
            direction = {i: self.vector.row(i + 1) for i in (blocks if blocks is not None else range(n))}
            if embeddings:
                direction.setdefault(0, self.vector.row(1))
        else:
            direction = self.vector.row(self.layer)
        return Ablation(model, direction, blocks=blocks, embeddings=embeddings)


def term_vector(export: Path, term) -> VectorArtifact:
    """The vector a manifest term names, checked against its recorded sha256."""
    path = export / term.vector_file
    vec = load_vector(path)
    if term.vector_sha256 and vec.sha256() != term.vector_sha256:
        raise VectorError(
            f"{path} does not match the vector recorded in {export / 'bakery.json'} (sha256 "
            f"{vec.sha256()[:12]}... != {term.vector_sha256[:12]}...): the file was changed after "
            "baking. Restore it, or pass --vector/--layer/--coef explicitly")
    return vec


def reference_for(export: str | Path, manifest: Manifest | None = None, *, vector: str | Path | None = None,
                  layer: int | None = None, coef: float | None = None, positions: str | None = None,
                  base_config: dict | None = None) -> Reference:
    """The runtime edit an export stands for, from its manifest; explicit settings override it
    (and then stand for one term: ``--vector``, ``--layer``, ``--coef``)."""
    export = Path(export)
    if manifest is None:
        if vector is None or layer is None or coef is None:
            manifest = Manifest.load(export)  # raises a clear ManifestError
    if vector is None and not manifest.terms:
        raise CompareError(f"{export / 'bakery.json'} records no vector terms: pass --vector/--layer/--coef")
    ablation = dict(manifest.ablation) if manifest and manifest.ablation else None
    if manifest is not None and (vector is None and layer is None and coef is None):
        vectors: dict[str, VectorArtifact] = {}  # one load per vector file
        terms = []
        for t in manifest.terms:
            if t.vector_file not in vectors:
                vectors[t.vector_file] = term_vector(export, t)
            terms.append(RefTerm(t.layer, t.coef, vectors[t.vector_file]))
        vec = terms[0].vector
    else:
        if vector is not None:  # the base model's depth sizes a llama.cpp control vector
            vec = load_vector(vector, num_layers=num_layers_of(base_config) if base_config else None)
        else:
            vec = term_vector(export, manifest.terms[0])
        L = layer if layer is not None else manifest.terms[0].layer
        c = coef if coef is not None else manifest.terms[0].coef
        terms = [RefTerm(L, c, vec)]
        if ablation is not None and layer is not None:
            ablation["layer"] = layer
    main_layer = int(ablation.get("layer", terms[0].layer)) if ablation else terms[0].layer
    pos = positions or (manifest.positions if manifest else "all")
    site = (manifest.site if manifest else None) or "resid-out"
    if site == "attn-out" and pos != "all":
        raise CompareError("an attn-out bake stands for steering at every position; --positions "
                           f"{pos} has no runtime reference at that site")
    if base_config is not None:
        for v in {id(t.vector): t.vector for t in terms}.values():
            v.check_model(base_config)
        for t in terms:
            t.vector.check_layer(t.layer, for_bake=True)
            if site == "attn-out" and not ablation:  # a block without the site: say so before any run
                attn_out_target(spec_for(base_config), base_config, t.layer)
    return Reference(vector=vec, layer=main_layer, terms=terms, positions=pos, ablation=ablation,
                     site=site if not ablation else "resid-out")


def base_model_of(export: str | Path, manifest: Manifest | None, model: str | None = None) -> Path:
    """The untouched model an export was baked from (``--model`` overrides the manifest)."""
    if model:
        return resolve_model(model)
    src = (manifest.source if manifest else {}) or {}
    for key in ("path", "model"):
        if src.get(key):
            try:
                return resolve_model(src[key])
            except FileNotFoundError:
                continue
    raise CompareError(f"cannot find the base model of {export}: its manifest names "
                       f"{src.get('model') or src.get('path') or 'none'}; pass --model")


def check_base_matches(export: Path, manifest: Manifest | None, base_dir: Path) -> None:
    """Refuse a base model other than the one the export was baked from (config hash)."""
    want = (manifest.source or {}).get("config_hash") if manifest else None
    if want and config_hash(read_config(base_dir)) != want:
        raise CompareError(f"the base model {base_dir} is not the one {export} was baked from "
                           f"(config hash {config_hash(read_config(base_dir))} != {want}); pass --model")
