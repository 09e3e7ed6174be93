"""Contrastive extraction: trait recipe in, persona vector artifact out.

Each pos/neg system prompt of a recipe is paired with each extraction question; the model answers
in batches, and the residual activations of every layer are captured *while it generates* (the
decode steps already run each response token through the model, so no second forward pass is
needed). Per example they are averaged over response tokens (``response_avg``), prompt tokens
(``prompt_avg``) or taken at the last prompt token (``prompt_last``); the vector of a variant is
``mean(pos examples) - mean(neg examples)`` per layer.

The held-out evaluation questions are answered the same way; their response averages, projected
on the vector, give the per-layer AUC and the recommended layer (``bakery.extraction.diagnostics``).

Results are cached per (model, recipe, settings) (``bakery.extraction.cache``) so that a re-run
is instant and other commands can take ``--trait NAME``; the capture itself is
``bakery.extraction.capture``.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch

from bakery.errors import BakeryError
from bakery.extraction import diagnostics
from bakery.extraction.cache import MAIN_FILE, entry_dir, model_id, output_targets, publish, write_entry
# moved to bakery.extraction.cache; re-exported until every caller imports them from there
from bakery.extraction.cache import cached_vector, list_cached, resolve_trait, sibling_paths  # noqa: F401
from bakery.extraction.capture import MODES, capture
from bakery.traits import TraitRecipe, load_trait_recipe
from bakery.io.folders import check_output
from bakery.models import config_hash
from bakery.steering.generation import render_chat
from bakery.naming import describe_layer
from bakery.vectors.artifact import VARIANTS, VectorArtifact
from bakery.vectors.load import load_vector

MAIN_VARIANT = "response_avg"


class ExtractError(BakeryError):
    """Extraction cannot produce a trustworthy vector (too few examples survive, bad settings)."""


@dataclass(frozen=True)
class ExtractSettings:
    """Everything besides the model and the recipe that shapes a vector (hashed for the cache)."""

    samples: int = 1  # answers per (pair, question, polarity)
    max_new_tokens: int = 48
    temperature: float = 0.7  # 0 is greedy
    top_p: float = 1.0
    seed: int = 0
    eval_pairs: int = 2  # system-prompt pairs used for each held-out question
    batch_size: int | None = 40  # None: as many as fit the device's free memory (40 on the CPU)
    capture: str = "single-pass"  # or "two-pass" (the reference: generate, then re-run each example)
    judge_model: str | None = None
    trait_threshold: float = 50.0
    coherence_threshold: float = 50.0
    min_pairs: int = 5  # stop when fewer pos/neg pairs survive the judge

    def check(self) -> None:
        if (self.samples < 1 or self.max_new_tokens < 1 or self.eval_pairs < 1
                or (self.batch_size is not None and self.batch_size < 1)):
            raise ExtractError("samples, max_new_tokens, batch_size and eval_pairs must be >= 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ExtractError("temperature must be >= 0 and top_p in (0, 1]")
        if self.capture not in MODES:
            raise ExtractError(f"capture must be 'single-pass' or 'two-pass'; got '{self.capture}'")

    def key(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("batch_size", "capture"):  # do not change the result beyond float noise
            d.pop(k)
        if not self.judge_model:
            for k in ("trait_threshold", "coherence_threshold", "min_pairs"):
                d.pop(k)
        return d


# ---- the pipeline -----------------------------------------------------------------------------

@dataclass
class Example:
    split: str  # extract | eval
    polarity: str  # pos | neg
    pair: int
    question: str
    sample: int
    system: str


def _examples(recipe: TraitRecipe, s: ExtractSettings) -> tuple[list[Example], list[Example]]:
    ext, ev = [], []
    for i, (pos, neg) in enumerate(recipe.pairs):
        for q in recipe.extract_questions:
            for k in range(s.samples):
                ext += [Example("extract", "pos", i, q, k, pos), Example("extract", "neg", i, q, k, neg)]
    npairs = len(recipe.pairs)
    for j, q in enumerate(recipe.eval_questions):
        for r in range(min(s.eval_pairs, npairs)):
            i = (j + r) % npairs
            pos, neg = recipe.pairs[i]
            ev += [Example("eval", "pos", i, q, 0, pos), Example("eval", "neg", i, q, 0, neg)]
    return ext, ev


def _judge_filter(judge, recipe: TraitRecipe, exs: list[Example], texts: list[str],
                  s: ExtractSettings, log: Callable[[str], None]) -> tuple[list[bool], list[dict]]:
    """Keep a pos/neg pair when pos >= trait threshold, neg < it, both coherent enough."""
    qa = [(e.question, t) for e, t in zip(exs, texts)]
    trait = judge.trait_scores(recipe.judge_rubric, qa)
    coh = judge.coherence_scores(qa)
    keep = [False] * len(exs)
    for a in range(0, len(exs), 2):
        b = a + 1  # examples come as (pos, neg) for the same pair, question and sample
        ok = (trait[a] is not None and trait[b] is not None and coh[a] is not None and coh[b] is not None
              and trait[a] >= s.trait_threshold and trait[b] < s.trait_threshold
              and coh[a] >= s.coherence_threshold and coh[b] >= s.coherence_threshold)
        keep[a] = keep[b] = ok
    kept = sum(keep) // 2
    log(f"judge filter ({s.judge_model}): {kept} of {len(exs) // 2} pos/neg pairs kept "
        f"(pos trait >= {s.trait_threshold:g}, neg < {s.trait_threshold:g}, both coherence >= "
        f"{s.coherence_threshold:g})")
    if kept < s.min_pairs:
        raise ExtractError(
            f"only {kept} pos/neg pair(s) survived the judge filter; at least {s.min_pairs} are "
            "needed. Try more --samples, stronger system prompts in the recipe, or lower "
            "--min-pairs; no vector was written.")
    scores = [{"trait_score": t, "coherence": c} for t, c in zip(trait, coh)]
    return keep, scores


def extract(recipe: TraitRecipe | str | os.PathLike, model: str | os.PathLike | None = None, *,
            out: str | os.PathLike | None = None, settings: ExtractSettings | None = None,
            judge=None, force: bool = False, use_cache: bool = True, trust_remote_code: bool = False,
            log: Callable[[str], None] | None = None, progress: bool = True,
            device: str | None = None, dtype: str | None = None) -> VectorArtifact:
    """Extract the three variants of a persona vector; return the ``response_avg`` artifact.

    Writes a cache entry (``bakery.extraction.cache``) and, with ``out``, the main vector there
    plus ``NAME.prompt_avg.safetensors``, ``NAME.prompt_last.safetensors``,
    ``NAME.responses.jsonl`` and ``NAME.layers.png`` beside it. Existing files at ``out`` are
    replaced only with ``force``, and only if they are a previous extraction's
    (``bakery.io.folders``). An existing cache entry for the same model, recipe and settings is
    reused unless ``use_cache`` is false. ``judge`` (a :class:`bakery.extraction.judge.Judge`)
    enables the pos/neg filter; it is created from ``settings.judge_model`` when not given.
    ``device``/``dtype`` place the model (default: :func:`bakery.placement.default_placement`).
    """
    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    s = settings or ExtractSettings()
    if judge is not None and not s.judge_model:  # a judged vector must not share a plain cache entry
        s = replace(s, judge_model=judge.model)
    s.check()
    if out is not None:  # before minutes of generation, not after
        for p, kind in output_targets(out).items():
            check_output(p, kind=kind, force=force)
    rec = recipe if isinstance(recipe, TraitRecipe) else load_trait_recipe(recipe)
    mid, mpath, cfg = model_id(model)
    entry = entry_dir(model, rec, s)
    main = entry / MAIN_FILE
    if main.is_file() and use_cache:
        log(f"using cached extraction {entry} (same model, recipe and settings; --no-cache to redo)")
    else:
        _run(rec, mid, mpath, cfg, s, entry, judge, trust_remote_code, log, progress,
             placement=dict(device=device, dtype=dtype))
    art = load_vector(main)
    if out is not None:
        publish(entry, out, force=force)
    return art


def _run(rec: TraitRecipe, mid: str, mpath: Path, cfg: dict, s: ExtractSettings, entry: Path,
         judge, trust_remote_code: bool, log: Callable[[str], None], progress: bool,
         placement: dict | None = None) -> None:
    from bakery.models import load_model, load_tokenizer
    from bakery.placement import auto_batch_size, input_device, model_dtype

    tok = load_tokenizer(mpath, trust_remote_code=trust_remote_code)
    ext, ev = _examples(rec, s)
    ext_prompts = [render_chat(tok, e.question, e.system) for e in ext]  # fails early: no template
    ev_prompts = [render_chat(tok, e.question, e.system) for e in ev]
    if s.judge_model and judge is None:
        from bakery.extraction.judge import Judge

        judge = Judge(s.judge_model)
    if judge is not None:
        judge.ping()  # an unreachable judge fails now, not after minutes of generation
    lm = load_model(mpath, trust_remote_code=trust_remote_code, **(placement or {}))
    if s.batch_size is None:
        longest = max(len(tok(p, add_special_tokens=False)["input_ids"]) for p in ext_prompts + ev_prompts)
        s = replace(s, batch_size=auto_batch_size(lm.config, longest + s.max_new_tokens + 1, default=40,
                                                  device=input_device(lm), dtype=model_dtype(lm),
                                                  hidden_states=True))
        if input_device(lm).type == "cuda":
            log(f"batch size {s.batch_size}: sized to the free memory of {input_device(lm)} "
                "(--batch-size overrides)")
    kw = dict(max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p,
              batch_size=s.batch_size, mode=s.capture)
    t0, c0 = time.perf_counter(), time.process_time()
    cap = capture(lm, tok, ext_prompts, seed=s.seed, progress="extraction answers" if progress else None, **kw)
    cap_ev = capture(lm, tok, ev_prompts, seed=s.seed + 1, progress="held-out answers" if progress else None, **kw)
    gen_s, cpu_s = time.perf_counter() - t0, time.process_time() - c0
    ntok = sum(cap.response_tokens) + sum(cap_ev.response_tokens)
    log(f"generated {len(ext) + len(ev)} answers ({ntok} response tokens) in {gen_s:.1f} s wall, "
        f"{cpu_s:.1f} s CPU on {torch.get_num_threads()} thread(s) ({s.capture} capture)")

    keep = [True] * len(ext)
    scores: list[dict] = [{} for _ in ext]
    if judge is not None:
        keep, scores = _judge_filter(judge, rec, ext, cap.texts, s, log)
    # an empty answer has no response tokens and would pull its mean towards zero
    for a in range(0, len(ext), 2):
        if cap.response_tokens[a] == 0 or cap.response_tokens[a + 1] == 0:
            keep[a] = keep[a + 1] = False
    kmask = torch.tensor(keep)
    pol = torch.tensor([e.polarity == "pos" for e in ext])
    npairs_kept = int((kmask & pol).sum())
    if npairs_kept == 0:
        raise ExtractError("no pos/neg pair has a non-empty answer on both sides: no vector written")
    ev_pol = torch.tensor([e.polarity == "pos" for e in ev])
    ev_ok = torch.tensor([n > 0 for n in cap_ev.response_tokens])
    if not (ev_pol & ev_ok).any() or not (~ev_pol & ev_ok).any():
        raise ExtractError("every held-out answer on one side is empty, so the layers cannot be "
                           "scored: raise --max-new-tokens or check the recipe's system prompts; no "
                           "vector was written.")

    arts: dict[str, VectorArtifact] = {}
    stats_by: dict[str, list[dict]] = {}
    rec_by: dict[str, int] = {}
    for v in VARIANTS:
        acts = cap.variant(v)
        vec = acts[kmask & pol].mean(0) - acts[kmask & ~pol].mean(0)
        stats = diagnostics.layer_stats(vec, cap_ev.response_avg[ev_pol & ev_ok],
                                        cap_ev.response_avg[~ev_pol & ev_ok])
        stats_by[v], rec_by[v] = stats, diagnostics.recommend_layer(stats)
        arts[v] = VectorArtifact(vec, {})
    common = {
        "model": mid, "model_config_hash": config_hash(cfg), "model_type": cfg.get("model_type"),
        "num_hidden_layers": arts[MAIN_VARIANT].num_layers, "hidden_size": arts[MAIN_VARIANT].hidden_size,
        "trait": rec.name, "description": rec.description,
        "recipe": {"name": rec.name, "hash": rec.content_hash(), "source": rec.source},
        "samples": {
            "pairs_generated": len(ext) // 2, "pairs_kept": npairs_kept,
            "pos": npairs_kept, "neg": npairs_kept,
            "eval_pos": int((ev_pol & ev_ok).sum()), "eval_neg": int((~ev_pol & ev_ok).sum()),
            "response_tokens": ntok,
        },
        "settings": {**asdict(s), "settings_hash": entry.name.rsplit("-", 1)[1]},
        "generation_seconds": round(gen_s, 1), "generation_cpu_seconds": round(cpu_s, 1),
        "torch_threads": torch.get_num_threads(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    for v in VARIANTS:
        arts[v].meta = {**common, "variant": v, "layers": stats_by[v],
                        "auc": [st["auc"] for st in stats_by[v]],
                        "recommended_layer": rec_by[v],
                        "recommended_layer_text": describe_layer(rec_by[v])}
    rows = []
    for split, exs, c, sc, kp in (("extract", ext, cap, scores, keep),
                                  ("eval", ev, cap_ev, [{} for _ in ev], [None] * len(ev))):
        for e, text, n, extra, k in zip(exs, c.texts, c.response_tokens, sc, kp):
            row = {"split": split, "polarity": e.polarity, "pair": e.pair, "sample": e.sample,
                   "system": e.system, "question": e.question, "answer": text, "response_tokens": n}
            row.update(extra)
            if k is not None:
                row["kept"] = k
            rows.append(row)
    write_entry(entry, arts, rows, stats_by[MAIN_VARIANT], rec_by[MAIN_VARIANT],
                f"{rec.name} on {mid}: response_avg")
