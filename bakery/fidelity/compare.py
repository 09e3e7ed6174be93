"""The fidelity harness: every bake measured against the runtime steering it stands for.

On held-out prompts, trajectories are sampled from the steered reference (the base model with the
steering hooks of every baked term, or with runtime ablation for an ``ortho`` bake;
:mod:`bakery.fidelity.reference`) and scored teacher-forced by the reference, the base model and
each bake (:mod:`bakery.fidelity.metrics`). Reported per candidate: per-token
``KL(steered || candidate)``, recovered effect ``R``, whether it is exact (the one rule of
:mod:`bakery.fidelity.exact`), top-1 agreement, greedy-continuation agreement over N tokens, the
mean projection of the residual stream at the layer onto the unit vector, and drift on neutral
text ``KL(base || candidate)`` next to the steered model's own drift. With a judge: trait and
coherence scores of sampled answers.

Outputs (:mod:`bakery.fidelity.report`) go to each export's ``compare/`` (``report.json``,
``report.md``, ``fidelity.png``) and to the ``fidelity`` section of its model card.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from bakery.fidelity.exact import exactness
from bakery.fidelity.metrics import drift, measure, model_scorer, no_hooks, sample_trajectories
from bakery.fidelity.probes import Probe, greedy_agreement, greedy_answers
from bakery.fidelity.prompts import NEUTRAL_PROMPTS, recipe_for, resolve_prompts
from bakery.fidelity.reference import CompareError, Reference, base_model_of, check_base_matches, reference_for
from bakery.fidelity.report import write_outputs
from bakery.io.manifest import Manifest
from bakery.models import load_model, load_tokenizer, read_config


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
    steps = 5 + 2 * len(candidates) + (1 if judge else 0)
    bar = tqdm(total=steps, desc="compare", unit="step", file=sys.stderr, disable=not progress)

    traj = sample_trajectories(base_model, tok, rendered, ref_ctx, max_new_tokens=max_new_tokens,
                               batch_size=batch_size, seed=seed)
    bar.update(1)
    pl = ref.probe_layer
    probes = {"steered": Probe(base_model, ref_ctx, pl, unit),
              "base": Probe(base_model, no_hooks, pl, unit)}
    for c in candidates:
        probes[c.name] = Probe(c.model, no_hooks, pl, unit)
    fid = measure(traj, probes["steered"], probes["base"],
                  {name: p for name, p in probes.items() if name != "steered"})
    bar.update(1)
    exact = {}
    for c in candidates:  # the one exactness rule, as `bakery verify` applies it
        exact[c.name] = exactness(fid[c.name], traj, c.model, base_model, c.export)
        bar.update(1)

    neutral_traj = sample_trajectories(base_model, tok, neutral, no_hooks, max_new_tokens=max_new_tokens,
                                       batch_size=batch_size, seed=seed + 1000)
    base_scorer = model_scorer(base_model)
    drifts = {"base": 0.0, "steered": drift(neutral_traj, base_scorer, model_scorer(base_model, ref_ctx))}
    bar.update(1)

    greedy = {"steered": greedy_answers(base_model, tok, rendered, ref_ctx, greedy_tokens, batch_size),
              "base": greedy_answers(base_model, tok, rendered, no_hooks, greedy_tokens, batch_size)}
    bar.update(2)
    for c in candidates:
        drifts[c.name] = drift(neutral_traj, base_scorer, model_scorer(c.model))
        greedy[c.name] = greedy_answers(c.model, tok, rendered, no_hooks, greedy_tokens, batch_size)
        bar.update(1)

    rows: dict[str, dict[str, Any]] = {}
    kl_base = fid["base"].kl_base
    for name in ["base", "steered", *[c.name for c in candidates]]:
        if name == "steered":
            row = {"kl": 0.0, "R": 1.0, "top1": 1.0}
        else:
            f = fid[name]
            row = {"kl": f.kl, "R": f.recovered, "top1": f.top1}
        if name in exact:
            row.update(exact=exact[name].exact, kl_bound=exact[name].kl_bound, exact_note=exact[name].summary())
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


# ---- the command's library function ------------------------------------------------------------
def compare(exports: Sequence[str | Path], *, model: str | None = None, vector: str | Path | None = None,
            layer: int | None = None, coef: float | None = None, positions: str | None = None,
            prompts: str | Path | Sequence[str] | None = None, max_new_tokens: int = 48, greedy_tokens: int = 32,
            judge=None, write: bool = True, progress: bool = True, seed: int = 0,
            log: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
            device: str | None = None, dtype: str | None = None,
            batch_size: int | None = 8) -> list[dict[str, Any]]:
    """Compare each export with the runtime edit it stands for; returns one report per group of
    exports that share a base model and a reference (usually one). ``device``/``dtype`` place the
    models (default: :func:`bakery.placement.default_placement`); ``batch_size=None`` sizes the
    batches to the device's free memory (8 where it cannot be told)."""
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
        qs, source = resolve_prompts(prompts, ref.vector.trait)
        log(f"[bakery] comparing {len(g['exports'])} export(s) with {ref.describe()} on {len(qs)} prompts")
        base = load_model(g["base"], device=device, dtype=dtype)
        tok = load_tokenizer(g["base"])
        names = _names(g["exports"])
        cands = [Candidate(n, p, load_model(p, device=device, dtype=dtype)) for n, p in zip(names, g["exports"])]
        recipe = recipe_for(ref.vector.trait)
        bs = batch_size or _auto_batch(base, tok, qs, max_new_tokens, log)
        report = run_comparison(base, tok, ref, cands, qs, max_new_tokens=max_new_tokens, batch_size=bs,
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


def _auto_batch(model, tok, prompts: Sequence[str], max_new_tokens: int, log: Callable[[str], None]) -> int:
    from bakery.placement import auto_batch_size, input_device, model_dtype
    from bakery.steering.generation import render_chat

    longest = max(len(tok(render_chat(tok, q), add_special_tokens=False)["input_ids"]) for q in prompts)
    dev = input_device(model)
    bs = auto_batch_size(model.config, longest + max_new_tokens, default=8, device=dev, dtype=model_dtype(model))
    if dev.type == "cuda":
        log(f"[bakery] batch size {bs}: sized to the free memory of {dev} (--batch-size overrides)")
    return bs


def _names(paths: Sequence[Path]) -> list[str]:
    names, seen = [], set()
    for p in paths:
        n = p.resolve().name
        while n in seen or n in ("base", "steered"):
            n = f"{n}'"
        seen.add(n)
        names.append(n)
    return names
