"""The fidelity harness: every bake measured against the runtime steering it stands for.

On held-out prompts, trajectories are sampled from the steered reference (the base model with the
steering hook, or with runtime ablation for an ``ortho`` bake) and scored teacher-forced by the
reference, the base model and each bake (:mod:`bakery.fidelity.metrics`). Reported per candidate:
per-token ``KL(steered || candidate)``, recovered effect ``R``, top-1 agreement, greedy-continuation
agreement over N tokens, the mean projection of the residual stream at the layer onto the unit
vector, and drift on neutral text ``KL(base || candidate)`` next to the steered model's own drift.
With a judge: trait and coherence scores of sampled answers.

Outputs go to each export's ``compare/`` (``report.json``, ``report.md``, ``fidelity.png``) and to
the ``fidelity`` section of its model card.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from bakery.arch import num_layers_of
from bakery.fidelity.metrics import ContextFactory, Scorer, drift, measure, sample_trajectories
from bakery.io.manifest import Manifest
from bakery.models import config_hash, load_model, load_tokenizer, read_config, resolve_model
from bakery.steering.hooks import Ablation, Steering, SteeringTerm, blocks_of
from bakery.vectors.artifact import VectorArtifact, VectorError, describe_layer, load_vector

# Held-out prompts used when neither --prompts nor a trait recipe gives evaluation questions.
DEFAULT_PROMPTS = [
    "How do I cook rice?",
    "What should I pack for a weekend trip?",
    "Can you explain how a bicycle works?",
    "Give me some advice for a job interview.",
    "What is your favourite season and why?",
    "How can I keep my houseplants alive?",
    "Tell me about the history of bread.",
    "What is a good way to learn a new language?",
    "Describe a rainy afternoon.",
    "How do I make a cup of tea?",
    "Why is the sky blue?",
    "What makes a good friend?",
    "How should I start running?",
    "Explain what a computer does.",
    "What would you do with a free day?",
    "Recommend a hobby for the winter.",
]
# Neutral text for drift: prompts far from any persona, answered by the untouched model.
NEUTRAL_PROMPTS = [
    "What is 12 times 7?",
    "List the days of the week.",
    "Write a Python function that returns the square of a number.",
    "What is the capital of France?",
    "Translate 'good morning' into Spanish.",
    "Name three primary colours.",
    "How many minutes are in an hour?",
    "Summarise the water cycle in two sentences.",
]


class CompareError(ValueError):
    """A comparison that cannot run as asked (bad export, settings or prompts)."""


# ---- what a bake stands for --------------------------------------------------------------------
@dataclass
class Reference:
    """The runtime edit a bake is measured against: steering terms and/or an ablation."""

    vector: VectorArtifact
    layer: int  # the row used for the projection metric
    terms: list[tuple[int, float]] = field(default_factory=list)  # (layer, coef) rows of ``vector``
    positions: str = "all"
    ablation: dict[str, Any] | None = None  # ortho: layer, blocks, embeddings, per_layer, add
    site: str = "resid-out"  # resid-out: output of block L-1; attn-out: after the attention of block L

    @property
    def probe_layer(self) -> int:
        """hidden_states row where the edit shows: the output of block L for the attn-out site."""
        return self.layer + 1 if self.site == "attn-out" else self.layer

    @property
    def coef(self) -> float:
        return self.terms[0][1] if self.terms else 0.0

    @property
    def kind(self) -> str:
        if self.ablation:
            return "ablation+steering" if self.ablation.get("add") else "ablation"
        return "steering"

    def unit(self) -> torch.Tensor:
        v = self.vector.row(self.layer).float()
        return v / v.norm().clamp_min(1e-12)

    def describe(self) -> str:
        if self.ablation:
            s = f"runtime ablation of v[{self.layer}] on every residual write"
            if self.ablation.get("embeddings") == "keep":
                s += " except the embedding output"
            if self.ablation.get("add"):
                s += f", then {self.ablation['add']:g} * r added at {describe_layer(self.layer)}"
            return s
        if self.site == "attn-out":
            parts = [f"after the attention of block {L}, v[{L}] coef {c:g}" for L, c in self.terms]
            return f"runtime steering ({'; '.join(parts)}), positions {self.positions}"
        parts = [f"{describe_layer(L)}, coef {c:g}" for L, c in self.terms]
        return f"runtime steering ({'; '.join(parts)}), positions {self.positions}"

    def key(self) -> tuple:
        return (self.vector.sha256(), self.layer, tuple(self.terms), self.positions, self.site,
                json.dumps(self.ablation, sort_keys=True, default=str))

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "layer": self.layer, "block": self.layer - 1,
                "layer_text": describe_layer(self.layer), "coef": self.coef,
                "terms": [{"layer": L, "coef": c} for L, c in self.terms], "probe_layer": self.probe_layer, "positions": self.positions,
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
            if not self.ablation and self.terms and self.site == "attn-out":
                stack.enter_context(AttnOutSteering(model, [(L, c * self.vector.row(L)) for L, c in self.terms]))
            elif not self.ablation and self.terms:
                terms = [SteeringTerm(L, self.vector.row(L), c) for L, c in self.terms]
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


class AttnOutSteering:
    """Adds a constant to the attention write of block ``L`` (after attention, before the MLP):
    the reference for ``--site attn-out`` bakes. Every position."""

    def __init__(self, model, deltas: Sequence[tuple[int, torch.Tensor]]):
        from bakery.arch import spec_for

        self.model, self.deltas, self.spec = model, list(deltas), spec_for(model.config)
        self._handles: list = []

    def __enter__(self) -> "AttnOutSteering":
        blocks = blocks_of(self.model, self.spec)
        for block, delta in self.deltas:
            mod = blocks[block].get_submodule(self.spec.attn_writer())

            def hook(m, a, out, d=delta.detach().float()):
                h = out[0] if isinstance(out, tuple) else out
                h = h + d.to(dtype=h.dtype, device=h.device)
                return (h, *out[1:]) if isinstance(out, tuple) else h

            self._handles.append(mod.register_forward_hook(hook))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def _term_vector(export: Path, term) -> VectorArtifact:
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
    """The runtime edit an export stands for, from its manifest; explicit settings override it."""
    export = Path(export)
    if manifest is None:
        if vector is None or layer is None or coef is None:
            manifest = Manifest.load(export)  # raises a clear ManifestError
    if vector is not None:  # the base model's depth sizes a llama.cpp control vector
        vec = load_vector(vector, num_layers=num_layers_of(base_config) if base_config else None)
    else:
        if not manifest.terms:
            raise CompareError(f"{export / 'bakery.json'} records no vector terms: pass --vector/--layer/--coef")
        vec = _term_vector(export, manifest.terms[0])
    ablation = dict(manifest.ablation) if manifest and manifest.ablation else None
    if manifest is not None and (vector is None and layer is None and coef is None):
        terms = [(t.layer, t.coef) for t in manifest.terms]
        if len({t.vector_file for t in manifest.terms}) > 1:
            raise CompareError("bakes of several different vectors are not supported by compare yet; "
                               "pass --vector/--layer/--coef for the one to measure")
    else:
        L = layer if layer is not None else manifest.terms[0].layer
        c = coef if coef is not None else manifest.terms[0].coef
        terms = [(L, c)]
        if ablation is not None and layer is not None:
            ablation["layer"] = layer
    main_layer = int(ablation.get("layer", terms[0][0])) if ablation else terms[0][0]
    pos = positions or (manifest.positions if manifest else "all")
    site = (manifest.site if manifest else None) or "resid-out"
    if site == "attn-out" and pos != "all":
        raise CompareError("an attn-out bake stands for steering at every position; --positions "
                           f"{pos} has no runtime reference at that site")
    if base_config is not None:
        vec.check_model(base_config)
        for L, _ in terms:
            vec.check_layer(L, for_bake=True)
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
    want = (manifest.source or {}).get("config_hash") if manifest else None
    if want and config_hash(read_config(base_dir)) != want:
        raise CompareError(f"the base model {base_dir} is not the one {export} was baked from "
                           f"(config hash {config_hash(read_config(base_dir))} != {want}); pass --model")


# ---- prompts -----------------------------------------------------------------------------------
def load_prompts(path: str | Path) -> list[str]:
    """Prompts from a text file (one per line), a JSON list of strings, or a trait recipe YAML
    (its evaluation questions)."""
    p = Path(path)
    if not p.is_file():
        raise CompareError(f"prompts file not found: {p}")
    if p.suffix in (".yaml", ".yml"):
        from bakery.extraction.recipes import load_trait_recipe

        return list(load_trait_recipe(p).eval_questions)
    text = p.read_text(encoding="utf-8")
    if p.suffix == ".json":
        data = json.loads(text)
        if not isinstance(data, list) or not all(isinstance(x, str) and x.strip() for x in data):
            raise CompareError(f"{p} must hold a JSON list of non-empty strings")
        prompts = [x.strip() for x in data]
    else:
        prompts = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    if not prompts:
        raise CompareError(f"{p} holds no prompts (one per line, or a JSON list of strings)")
    return prompts


def recipe_for(trait: str | None):
    """The built-in trait recipe of that name, or None."""
    if not trait:
        return None
    try:
        from bakery.extraction.recipes import load_trait_recipe

        return load_trait_recipe(trait)
    except Exception:
        return None


def default_prompts(trait: str | None) -> tuple[list[str], str]:
    recipe = recipe_for(trait)
    if recipe is not None:
        return list(recipe.eval_questions), f"eval questions of the '{trait}' recipe"
    return list(DEFAULT_PROMPTS), "bakery's built-in held-out prompts"


# ---- measurements ------------------------------------------------------------------------------
class Probe:
    """Scorer wrapper that also records the mean projection of block ``layer-1``'s output onto
    ``unit`` over response tokens."""

    def __init__(self, model, context: ContextFactory, layer: int, unit: torch.Tensor):
        self.model, self.context, self.layer, self.unit = model, context, layer, unit
        self.total, self.count = 0.0, 0

    @property
    def projection(self) -> float:
        return self.total / max(self.count, 1)

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor, mask: torch.Tensor, prompt_len: int) -> torch.Tensor:
        captured: dict[str, torch.Tensor] = {}
        block = blocks_of(self.model)[self.layer - 1]
        with self.context(prompt_len):
            # registered after the context's hooks, so it sees the edited output
            h = block.register_forward_hook(
                lambda m, a, o: captured.__setitem__("h", (o[0] if isinstance(o, tuple) else o).detach()))
            try:
                logits = self.model(input_ids=ids.to(self.model.device),
                                    attention_mask=mask.to(self.model.device)).logits.float().cpu()
            finally:
                h.remove()
        hid = captured["h"].float().cpu()[:, prompt_len:]
        keep = mask[:, prompt_len:].bool()
        proj = hid[keep] @ self.unit
        self.total += float(proj.sum())
        self.count += int(proj.numel())
        return logits


def _no_context(prompt_len: int | None = None):
    return contextlib.nullcontext()


def greedy_answers(model, tok, prompts: Sequence[str], context: ContextFactory, n_tokens: int,
                   batch_size: int = 8) -> list[list[int]]:
    from bakery.steering.generation import generate

    out: list[list[int]] = []
    for i in range(0, len(prompts), batch_size):
        with context(None):
            g = generate(model, tok, list(prompts[i:i + batch_size]), max_new_tokens=n_tokens, temperature=0.0)
        out.extend(g.response_ids(j) for j in range(len(g.texts)))
    return out


def greedy_agreement(ref: Sequence[Sequence[int]], cand: Sequence[Sequence[int]]) -> float:
    """Mean over prompts of the common prefix length of two greedy continuations divided by the
    longer one's length: 1 when they are identical, 0 when they differ from the first token."""
    scores = []
    for a, b in zip(ref, cand):
        n = max(len(a), len(b))
        if n == 0:
            scores.append(1.0)
            continue
        k = 0
        while k < min(len(a), len(b)) and a[k] == b[k]:
            k += 1
        scores.append(k / n)
    return sum(scores) / max(len(scores), 1)


@dataclass
class Candidate:
    """A bake to compare: its export folder, loaded model and display name."""

    name: str
    export: Path
    model: Any


def _mean(xs: Sequence[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return sum(vals) / len(vals) if vals else None


def run_comparison(base_model, tok, ref: Reference, candidates: Sequence[Candidate], prompts: Sequence[str],
                   *, max_new_tokens: int = 48, greedy_tokens: int = 32, neutral_prompts: Sequence[str] = NEUTRAL_PROMPTS,
                   judge=None, rubric: str | None = None, batch_size: int = 8, seed: int = 0,
                   progress: bool = True) -> dict[str, Any]:
    """All metrics for ``candidates`` against ``ref`` applied to ``base_model``. Rows: ``base``,
    ``steered`` (the reference itself) and one per candidate."""
    from tqdm.auto import tqdm

    from bakery.steering.generation import render_chat

    rendered = [render_chat(tok, q) for q in prompts]
    neutral = [render_chat(tok, q) for q in neutral_prompts]
    ref_ctx = ref.context(base_model)
    unit = ref.unit()
    steps = 5 + len(candidates) + (1 if judge else 0)
    bar = tqdm(total=steps, desc="compare", unit="step", file=sys.stderr, disable=not progress)

    traj = sample_trajectories(base_model, tok, rendered, ref_ctx, max_new_tokens=max_new_tokens,
                               batch_size=batch_size, seed=seed)
    bar.update(1)
    pl = ref.probe_layer
    probes = {"steered": Probe(base_model, ref_ctx, pl, unit),
              "base": Probe(base_model, _no_context, pl, unit)}
    for c in candidates:
        probes[c.name] = Probe(c.model, _no_context, pl, unit)
    fid = measure(traj, probes["steered"], probes["base"],
                  {name: p for name, p in probes.items() if name != "steered"})
    bar.update(1)

    neutral_traj = sample_trajectories(base_model, tok, neutral, _no_context, max_new_tokens=max_new_tokens,
                                       batch_size=batch_size, seed=seed + 1000)
    base_scorer = _plain_scorer(base_model, _no_context)
    drifts = {"base": 0.0, "steered": drift(neutral_traj, base_scorer, _plain_scorer(base_model, ref_ctx))}
    bar.update(1)

    greedy = {"steered": greedy_answers(base_model, tok, rendered, ref_ctx, greedy_tokens, batch_size),
              "base": greedy_answers(base_model, tok, rendered, _no_context, greedy_tokens, batch_size)}
    bar.update(2)
    for c in candidates:
        drifts[c.name] = drift(neutral_traj, base_scorer, _plain_scorer(c.model, _no_context))
        greedy[c.name] = greedy_answers(c.model, tok, rendered, _no_context, greedy_tokens, batch_size)
        bar.update(1)

    rows: dict[str, dict[str, Any]] = {}
    kl_base = fid["base"].kl_base
    for name in ["base", "steered", *[c.name for c in candidates]]:
        if name == "steered":
            row = {"kl": 0.0, "R": 1.0, "top1": 1.0}
        else:
            f = fid[name]
            row = {"kl": f.kl, "R": f.recovered, "top1": f.top1}
        row.update(greedy_agreement=greedy_agreement(greedy["steered"], greedy[name]),
                   projection=probes[name].projection, drift=drifts[name])
        rows[name] = row

    answers = {"steered": _decode(tok, greedy["steered"]), "base": _decode(tok, greedy["base"])}
    for c in candidates:
        answers[c.name] = _decode(tok, greedy[c.name])
    if judge is not None:
        scores = judge_rows(judge, rubric, prompts, answers)
        for name, s in scores.items():
            rows[name].update(s)
        bar.update(1)
    bar.close()
    return {
        "reference": ref.to_dict(),
        "kl_steered_vs_base": kl_base,
        "tokens": fid["base"].tokens,
        "prompts": list(prompts),
        "max_new_tokens": max_new_tokens,
        "greedy_tokens": greedy_tokens,
        "neutral_prompts": list(neutral_prompts),
        "neutral_tokens": neutral_traj.num_response_tokens,
        "rows": rows,
        "candidates": {c.name: str(c.export) for c in candidates},
        "samples": [{"prompt": p, **{k: v[i] for k, v in answers.items()}} for i, p in enumerate(prompts[:4])],
        "answers": answers,  # greedy answers per row, in prompt order
    }


def _decode(tok, seqs: Sequence[Sequence[int]]) -> list[str]:
    return [tok.decode(s, skip_special_tokens=True).strip() for s in seqs]


def _plain_scorer(model, context: ContextFactory) -> Scorer:
    from bakery.fidelity.metrics import model_scorer

    return model_scorer(model, context)


def judge_rows(judge, rubric: str | None, prompts: Sequence[str],
               answers: dict[str, list[str]]) -> dict[str, dict[str, float | None]]:
    """Mean judge trait (when a rubric is known) and coherence scores of each row's answers."""
    out: dict[str, dict[str, float | None]] = {}
    for name, texts in answers.items():
        pairs = list(zip(prompts, texts))
        row = {"coherence": _mean(judge.coherence_scores(pairs))}
        if rubric:
            row["trait"] = _mean(judge.trait_scores(rubric, pairs))
        out[name] = row
    return out


# ---- outputs -----------------------------------------------------------------------------------
_COLUMNS = [("R", "R", "{:.5f}"), ("kl", "KL(steered‖·)", "{:.2e}"), ("top1", "top-1", "{:.3f}"),
            ("greedy_agreement", "greedy agree", "{:.3f}"), ("projection", "projection", "{:.2f}"),
            ("drift", "neutral drift", "{:.2e}"), ("trait", "judge trait", "{:.1f}"),
            ("coherence", "judge coherence", "{:.1f}")]


def markdown_table(report: dict[str, Any], only: Sequence[str] | None = None) -> str:
    rows = report["rows"]
    names = [n for n in rows if only is None or n in only]
    cols = [c for c in _COLUMNS if any(c[0] in rows[n] for n in names)]
    lines = ["| model | " + " | ".join(c[1] for c in cols) + " |",
             "| --- |" + " ---: |" * len(cols)]
    for n in names:
        cells = []
        for key, _, fmt in cols:
            v = rows[n].get(key)
            cells.append("—" if v is None or (isinstance(v, float) and v != v) else fmt.format(v))
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_report(report: dict[str, Any], only: Sequence[str] | None = None) -> str:
    ref = report["reference"]
    head = (f"Reference: {ref['description']}. {len(report['prompts'])} held-out prompts "
            f"({report.get('prompt_source', 'given')}), {report['tokens']} response tokens sampled from "
            f"the reference (row \"steered\": {ref['kind']}), up to {report['max_new_tokens']} per prompt, teacher-forced; "
            f"KL(steered ‖ base) = {report['kl_steered_vs_base']:.4f} per token. R = 1 − "
            "KL(steered ‖ bake) / KL(steered ‖ base). Greedy agreement: shared prefix of "
            f"{report['greedy_tokens']}-token greedy answers with the steered model's. Projection: "
            f"mean of the {describe_layer(ref.get('probe_layer', ref['layer']))} residual onto the unit vector, on the "
            f"steered trajectories. Neutral drift: KL(base ‖ ·) on {report['neutral_tokens']} tokens "
            "of the untouched model's answers to neutral prompts.")
    return head + "\n\n" + markdown_table(report, only) + "\n"


def plot(report: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    names = list(rows)
    colors = ["#999999" if n == "base" else "#d62728" if n == "steered" else "#1f77b4" for n in names]
    panels = [("R", "recovered effect R"), ("top1", "top-1 agreement"),
              ("greedy_agreement", "greedy agreement"), ("projection", "projection onto v"),
              ("drift", "neutral drift KL(base‖·)")]
    if any("trait" in r for r in rows.values()):
        panels.append(("trait", "judge trait score"))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.6))
    for ax, (key, title) in zip(axes, panels):
        vals = [rows[n].get(key) for n in names]
        vals = [float("nan") if v is None else v for v in vals]
        ax.bar(range(len(names)), vals, color=colors)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
        ax.set_title(title, fontsize=9)
        if key in ("R", "top1", "greedy_agreement"):
            ax.set_ylim(min(0.0, *[v for v in vals if v == v] or [0]), 1.05)
    ref = report["reference"]
    fig.suptitle(f"{ref['description']} — {report['tokens']} response tokens", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_outputs(export: Path, report: dict[str, Any], own: str | None) -> Path:
    """``compare/`` (JSON, markdown, PNG) written to a temp folder and renamed; card section."""
    from bakery.io.card_sections import write_section

    from bakery.io.checkpoint import atomic_folder

    export = Path(export)
    final = export / "compare"
    with atomic_folder(final, force=True) as tmp:  # compare/ is this command's own folder
        (tmp / "report.json").write_text(json.dumps({**report, "this_export": own}, indent=2) + "\n")
        (tmp / "report.md").write_text(markdown_report(report))
        plot(report, tmp / "fidelity.png")
        for keep in ("verify.json",):  # written by `bakery verify`; not this command's to drop
            if (final / keep).is_file():
                shutil.copy2(final / keep, tmp / keep)
    only = ["base", "steered"] + ([own] if own else [])
    write_section(export, "fidelity", "## Fidelity\n\n" + markdown_report(report, only)
                  + "\n![fidelity](compare/fidelity.png)\n")
    return final


# ---- the command's library function ------------------------------------------------------------
def compare(exports: Sequence[str | Path], *, model: str | None = None, vector: str | Path | None = None,
            layer: int | None = None, coef: float | None = None, positions: str | None = None,
            prompts: str | Path | Sequence[str] | None = None, max_new_tokens: int = 48, greedy_tokens: int = 32,
            judge=None, write: bool = True, progress: bool = True, seed: int = 0,
            log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> list[dict[str, Any]]:
    """Compare each export with the runtime edit it stands for; returns one report per group of
    exports that share a base model and a reference (usually one)."""
    if not exports:
        raise CompareError("give at least one export folder")
    paths = [Path(e) for e in exports]
    for p in paths:
        if not (p / "config.json").is_file():
            raise CompareError(f"{p} is not an exported model folder (no config.json)")
    explicit = vector is not None and layer is not None and coef is not None
    manifests = {p: (Manifest.load(p) if not explicit or (p / "bakery.json").is_file() else None) for p in paths}

    groups: dict[tuple, dict[str, Any]] = {}
    for p in paths:
        m = manifests[p]
        base_dir = base_model_of(p, m, model)
        check_base_matches(p, m, base_dir)
        ref = reference_for(p, m, vector=vector, layer=layer, coef=coef, positions=positions,
                            base_config=read_config(base_dir))
        key = (str(base_dir), ref.key())
        groups.setdefault(key, {"base": base_dir, "ref": ref, "exports": []})["exports"].append(p)

    reports = []
    for g in groups.values():
        ref: Reference = g["ref"]
        if isinstance(prompts, (str, Path)):
            qs, source = load_prompts(prompts), f"from {prompts}"
        elif prompts:
            qs, source = list(prompts), "given"
        else:
            qs, source = default_prompts(ref.vector.trait)
        log(f"[bakery] comparing {len(g['exports'])} export(s) with {ref.describe()} on {len(qs)} prompts")
        base = load_model(g["base"])
        tok = load_tokenizer(g["base"])
        names = _names(g["exports"])
        cands = [Candidate(n, p, load_model(p)) for n, p in zip(names, g["exports"])]
        recipe = recipe_for(ref.vector.trait)
        report = run_comparison(base, tok, ref, cands, qs, max_new_tokens=max_new_tokens,
                                greedy_tokens=greedy_tokens, judge=judge,
                                rubric=recipe.judge_rubric if recipe else None, progress=progress, seed=seed)
        report["prompt_source"] = source
        report["base_model"] = str(g["base"])
        if judge is not None:
            report["judge"] = judge.where
        if write:
            for n, p in zip(names, g["exports"]):
                write_outputs(p, report, n)
        reports.append(report)
    return reports


def _names(paths: Sequence[Path]) -> list[str]:
    names, seen = [], set()
    for p in paths:
        n = p.resolve().name
        while n in seen or n in ("base", "steered"):
            n = f"{n}'"
        seen.add(n)
        names.append(n)
    return names
