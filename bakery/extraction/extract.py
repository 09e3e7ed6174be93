"""Contrastive extraction: trait recipe in, persona vector artifact out.

Each pos/neg system prompt of a recipe is paired with each extraction question; the model answers
in batches, and the residual activations of every layer are captured *while it generates* (the
decode steps already run each response token through the model, so no second forward pass is
needed). Per example they are averaged over response tokens (``response_avg``), prompt tokens
(``prompt_avg``) or taken at the last prompt token (``prompt_last``); the vector of a variant is
``mean(pos examples) - mean(neg examples)`` per layer.

The held-out evaluation questions are answered the same way; their response averages, projected
on the vector, give the per-layer AUC and the recommended layer (``bakery.extraction.diagnostics``).

Results are cached per (model, recipe, settings) under ``cache_dir()/vectors`` so that other
commands can take ``--trait NAME``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from bakery.extraction import diagnostics
from bakery.io.checkpoint import atomic_folder
from bakery.steering.generation import encode_prompts, eos_token_ids, render_chat
from bakery.models import cache_dir, config_hash, read_config, resolve_model
from bakery.extraction.recipes import TraitRecipe, load_trait_recipe
from bakery.vectors.artifact import VARIANTS, VectorArtifact, describe_layer, load_vector

MAIN_VARIANT = "response_avg"


class ExtractError(RuntimeError):
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
    batch_size: int = 40
    capture: str = "single-pass"  # or "two-pass" (the reference: generate, then re-run each example)
    judge_model: str | None = None
    trait_threshold: float = 50.0
    coherence_threshold: float = 50.0
    min_pairs: int = 5  # stop when fewer pos/neg pairs survive the judge

    def check(self) -> None:
        if self.samples < 1 or self.max_new_tokens < 1 or self.batch_size < 1 or self.eval_pairs < 1:
            raise ExtractError("samples, max_new_tokens, batch_size and eval_pairs must be >= 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ExtractError("temperature must be >= 0 and top_p in (0, 1]")
        if self.capture not in ("single-pass", "two-pass"):
            raise ExtractError(f"capture must be 'single-pass' or 'two-pass'; got '{self.capture}'")

    def key(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("batch_size", "capture"):  # do not change the result beyond float noise
            d.pop(k)
        if not self.judge_model:
            for k in ("trait_threshold", "coherence_threshold", "min_pairs"):
                d.pop(k)
        return d


# ---- activation capture -----------------------------------------------------------------------

@dataclass
class Captured:
    """Per-example activation means, ``[N, L+1, H]`` float32, and the answers."""

    texts: list[str]
    response_tokens: list[int]
    response_avg: torch.Tensor
    prompt_avg: torch.Tensor
    prompt_last: torch.Tensor

    def variant(self, name: str) -> torch.Tensor:
        return getattr(self, name)


def _eos_ids(model, tok) -> torch.Tensor:
    return torch.tensor(eos_token_ids(model, tok) or [-1])


def _gen_kwargs(tok, max_new_tokens: int, temperature: float, top_p: float) -> dict[str, Any]:
    kw: dict[str, Any] = dict(max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id)
    if temperature > 0:
        kw.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
    else:
        kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    return kw


def _response_ids(gen: torch.Tensor, eos: torch.Tensor, limit: int) -> list[list[int]]:
    """Generated ids per row, cut at the first end-of-sequence token (excluded) and at ``limit``."""
    out = []
    for row in gen[:, :limit].tolist():
        ids = []
        for t in row:
            if t in eos:
                break
            ids.append(t)
        out.append(ids)
    return out


@torch.no_grad()
def _capture_batch_single(model, tok, prompts: Sequence[str], *, max_new_tokens: int,
                          temperature: float, top_p: float) -> Captured:
    """Generate and capture in the same forward calls.

    A forward hook on the model reads ``hidden_states`` of every call ``generate`` makes: the
    prefill gives the prompt activations; decode step ``k`` feeds generated token ``k-1``, so its
    hidden states are that response token's. One extra token is generated so that the last kept
    token is fed too; tokens from the end of sequence on are skipped (as the reference skips
    special tokens).
    """
    enc = encode_prompts(tok, prompts).to(model.device)
    pmask = enc["attention_mask"].float()
    B, P = enc["input_ids"].shape
    eos = _eos_ids(model, tok).to(model.device)
    st: dict[str, Any] = {"step": 0, "done": torch.zeros(B, dtype=torch.bool, device=model.device)}

    def hook(module, args, kwargs, output):
        hs = output.hidden_states
        step = st["step"]
        st["step"] += 1
        if step == 0:
            w = pmask[:, :, None]
            st["prompt_avg"] = torch.stack([(h.float() * w).sum(1) for h in hs], 1) / w.sum(1)[:, None]
            st["prompt_last"] = torch.stack([h[:, -1].float() for h in hs], 1)
            st["resp_sum"] = torch.zeros_like(st["prompt_last"])
            st["resp_n"] = torch.zeros(B, device=model.device)
            return
        if step > max_new_tokens:
            return
        fed = kwargs["input_ids"][:, -1]
        is_eos = torch.isin(fed, eos)
        valid = ~st["done"] & ~is_eos
        st["done"] |= is_eos
        cur = torch.stack([h[:, -1].float() for h in hs], 1)
        st["resp_sum"] += cur * valid[:, None, None].float()
        st["resp_n"] += valid.float()

    def ask_for_hidden_states(module, args, kwargs):
        # set per forward call rather than through generate(), which warns about the flag
        return args, {**kwargs, "output_hidden_states": True}

    handles = [model.register_forward_pre_hook(ask_for_hidden_states, with_kwargs=True),
               model.register_forward_hook(hook, with_kwargs=True)]
    try:
        seqs = model.generate(**enc, **_gen_kwargs(tok, max_new_tokens + 1, temperature, top_p))
    finally:
        for h in handles:
            h.remove()
    ids = _response_ids(seqs[:, P:].cpu(), eos.cpu(), max_new_tokens)
    n = st["resp_n"].clamp(min=1)[:, None, None]
    return Captured(
        texts=[tok.decode(x, skip_special_tokens=True).strip() for x in ids],
        response_tokens=[len(x) for x in ids],
        response_avg=(st["resp_sum"] / n).cpu(), prompt_avg=st["prompt_avg"].cpu(),
        prompt_last=st["prompt_last"].cpu(),
    )


@torch.no_grad()
def _capture_batch_two_pass(model, tok, prompts: Sequence[str], *, max_new_tokens: int,
                            temperature: float, top_p: float) -> Captured:
    """The reference approach: generate, then one unbatched forward per example."""
    enc = encode_prompts(tok, prompts).to(model.device)
    P = enc["input_ids"].shape[1]
    eos = _eos_ids(model, tok)
    seqs = model.generate(**enc, **_gen_kwargs(tok, max_new_tokens, temperature, top_p))
    ids = _response_ids(seqs[:, P:].cpu(), eos, max_new_tokens)
    ra, pa, pl = [], [], []
    for i in range(len(prompts)):
        prompt = enc["input_ids"][i][enc["attention_mask"][i].bool()].cpu()
        full = torch.cat([prompt, torch.tensor(ids[i], dtype=prompt.dtype)])[None].to(model.device)
        hs = model(input_ids=full, output_hidden_states=True).hidden_states
        stack = torch.stack([h[0].float() for h in hs], 0)  # [L+1, S, H]
        np_ = prompt.numel()
        pa.append(stack[:, :np_].mean(1))
        pl.append(stack[:, np_ - 1])
        resp = stack[:, np_:]
        ra.append(resp.mean(1) if resp.shape[1] else torch.zeros_like(stack[:, 0]))
    return Captured(
        texts=[tok.decode(x, skip_special_tokens=True).strip() for x in ids],
        response_tokens=[len(x) for x in ids], response_avg=torch.stack(ra).cpu(),
        prompt_avg=torch.stack(pa).cpu(), prompt_last=torch.stack(pl).cpu(),
    )


def capture(model, tok, prompts: Sequence[str], *, max_new_tokens: int = 48,
            temperature: float = 0.0, top_p: float = 1.0, batch_size: int = 32, seed: int = 0,
            mode: str = "single-pass", progress: str | None = None) -> Captured:
    """Answer rendered ``prompts`` and capture per-example activation means of every layer.

    Prompts are batched by length (less padding); results come back in the input order.
    """
    from tqdm.auto import tqdm

    fn = _capture_batch_single if mode == "single-pass" else _capture_batch_two_pass
    lengths = [len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: lengths[i])
    parts: list[tuple[list[int], Captured]] = []
    torch.manual_seed(seed)
    bar = tqdm(total=len(prompts), desc=progress or "generating", unit="answer",
               disable=progress is None, file=sys.stderr)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        parts.append((idx, fn(model, tok, [prompts[i] for i in idx], max_new_tokens=max_new_tokens,
                              temperature=temperature, top_p=top_p)))
        bar.update(len(idx))
    bar.close()
    n = len(prompts)
    texts: list[str] = [""] * n
    counts = [0] * n
    tensors = {v: None for v in VARIANTS}
    for idx, c in parts:
        for j, i in enumerate(idx):
            texts[i], counts[i] = c.texts[j], c.response_tokens[j]
        for v in VARIANTS:
            t = c.variant(v)
            if tensors[v] is None:
                tensors[v] = torch.empty((n, *t.shape[1:]), dtype=torch.float32)
            tensors[v][idx] = t
    return Captured(texts, counts, tensors["response_avg"], tensors["prompt_avg"], tensors["prompt_last"])


# ---- model identity and the vector cache ------------------------------------------------------

def model_id(model: str | os.PathLike | None) -> tuple[str, Path, dict[str, Any]]:
    """(id to record, resolved folder, config). Built-in aliases record their Hub id."""
    path = resolve_model(model)
    cfg = read_config(path)
    src = path / "bakery_source.json"
    if src.is_file():
        mid = json.loads(src.read_text()).get("hub_id") or str(model)
    else:
        mid = cfg.get("_name_or_path") or (str(model) if model and not Path(str(model)).exists() else path.name)
    return str(mid), path, cfg


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", s).strip("_") or "model"


def vectors_cache_root() -> Path:
    return cache_dir() / "vectors"


def _model_cache_dir(model: str | os.PathLike | None) -> Path:
    mid, _, cfg = model_id(model)
    return vectors_cache_root() / f"{_slug(mid)}-{config_hash(cfg)}"


def settings_hash(recipe: TraitRecipe, settings: ExtractSettings) -> str:
    blob = json.dumps({"recipe": recipe.content_hash(), "settings": settings.key(),
                       "diagnostics": diagnostics.DIAGNOSTICS_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def list_cached(model: str | os.PathLike | None = None) -> list[tuple[str, Path]]:
    """(trait, main vector file) for every cached extraction of ``model``, newest first."""
    d = _model_cache_dir(model)
    if not d.is_dir():
        return []
    found = []
    for entry in d.iterdir():
        main = entry / "vector.safetensors"
        if entry.is_dir() and main.is_file():
            found.append((entry.name.rsplit("-", 1)[0], main, main.stat().st_mtime))
    found.sort(key=lambda t: -t[2])
    return [(t, p) for t, p, _ in found]


def cached_vector(trait: str, model: str | os.PathLike | None = None) -> Path | None:
    """The newest cached ``response_avg`` vector of ``trait`` for ``model``, or None."""
    for t, p in list_cached(model):
        if t == trait:
            return p
    return None


def resolve_trait(trait: str, model: str | os.PathLike | None = None) -> Path:
    """Like :func:`cached_vector`, but a clear error that says how to extract it when missing."""
    p = cached_vector(trait, model)
    if p is None:
        have = sorted({t for t, _ in list_cached(model)})
        raise FileNotFoundError(
            f"no cached vector for trait '{trait}' and model '{model or 'default'}' (cached: "
            f"{', '.join(have) or 'none'}). Run `bakery extract --recipe {trait}` first, or pass "
            "--vector FILE.")
    return p


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


def sibling_paths(out: str | os.PathLike) -> dict[str, Path]:
    """Files written beside the main vector ``NAME.safetensors``."""
    out = Path(out)
    stem = out.name[: -len(".safetensors")] if out.name.endswith(".safetensors") else out.stem
    base = out.with_name(stem)
    return {
        "response_avg": out,
        "prompt_avg": base.with_name(f"{stem}.prompt_avg.safetensors"),
        "prompt_last": base.with_name(f"{stem}.prompt_last.safetensors"),
        "responses": base.with_name(f"{stem}.responses.jsonl"),
        "plot": base.with_name(f"{stem}.layers.png"),
    }


def _write_entry(folder: Path, arts: dict[str, VectorArtifact], rows: list[dict], stats: list[dict],
                 recommended: int, title: str) -> None:
    """The cache entry layout: vector[.variant].safetensors, responses.jsonl, layers.png."""
    names = sibling_paths(folder / "vector.safetensors")
    for v, art in arts.items():
        art.save(names[v])
    with open(names["responses"], "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    diagnostics.plot(stats, names["plot"], title=title, recommended=recommended)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publish(entry: Path, out: Path) -> dict[str, Path]:
    """Copy a cache entry to ``out`` and its siblings: temp files first, renamed at the end."""
    src = sibling_paths(entry / "vector.safetensors")
    dst = sibling_paths(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmps = {}
    try:
        for k in src:
            fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".tmp")
            os.close(fd)
            shutil.copyfile(src[k], tmp)
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs are ordinary files
            tmps[k] = tmp
        for k, tmp in tmps.items():
            os.replace(tmp, dst[k])
    finally:
        for tmp in tmps.values():
            if os.path.exists(tmp):
                os.unlink(tmp)
    return dst


def extract(recipe: TraitRecipe | str | os.PathLike, model: str | os.PathLike | None = None, *,
            out: str | os.PathLike | None = None, settings: ExtractSettings | None = None,
            judge=None, force: bool = False, trust_remote_code: bool = False,
            log: Callable[[str], None] | None = None, progress: bool = True) -> VectorArtifact:
    """Extract the three variants of a persona vector; return the ``response_avg`` artifact.

    Writes a cache entry (``cache_dir()/vectors/<model>/<trait>-<hash>/``) and, with ``out``, the
    main vector there plus ``NAME.prompt_avg.safetensors``, ``NAME.prompt_last.safetensors``,
    ``NAME.responses.jsonl`` and ``NAME.layers.png`` beside it. An existing cache entry for the
    same model, recipe and settings is reused unless ``force``. ``judge`` (a
    :class:`bakery.extraction.judge.Judge`) enables the pos/neg filter; it is created from
    ``settings.judge_model`` when not given.
    """
    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    s = settings or ExtractSettings()
    if judge is not None and not s.judge_model:  # a judged vector must not share a plain cache entry
        s = replace(s, judge_model=judge.model)
    s.check()
    rec = recipe if isinstance(recipe, TraitRecipe) else load_trait_recipe(recipe)
    mid, mpath, cfg = model_id(model)
    entry = _model_cache_dir(model) / f"{rec.name}-{settings_hash(rec, s)}"
    main = entry / "vector.safetensors"
    if main.is_file() and not force:
        log(f"using cached extraction {entry} (same model, recipe and settings; --force to redo)")
    else:
        _run(rec, mid, mpath, cfg, s, entry, judge, trust_remote_code, log, progress)
    art = load_vector(main)
    if out is not None:
        _publish(entry, Path(out))
    return art


def _run(rec: TraitRecipe, mid: str, mpath: Path, cfg: dict, s: ExtractSettings, entry: Path,
         judge, trust_remote_code: bool, log: Callable[[str], None], progress: bool) -> None:
    from bakery.models import load_model, load_tokenizer

    tok = load_tokenizer(mpath, trust_remote_code=trust_remote_code)
    ext, ev = _examples(rec, s)
    ext_prompts = [render_chat(tok, e.question, e.system) for e in ext]  # fails early: no template
    ev_prompts = [render_chat(tok, e.question, e.system) for e in ev]
    if s.judge_model and judge is None:
        from bakery.extraction.judge import Judge

        judge = Judge(s.judge_model)
    if judge is not None:
        judge.ping()  # an unreachable judge fails now, not after minutes of generation
    lm = load_model(mpath, trust_remote_code=trust_remote_code)
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
    entry.parent.mkdir(parents=True, exist_ok=True)
    with atomic_folder(entry, force=True) as tmp:
        _write_entry(tmp, arts, rows, stats_by[MAIN_VARIANT], rec_by[MAIN_VARIANT],
                     f"{rec.name} on {mid}: response_avg")
