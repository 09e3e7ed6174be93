"""Persona persistence: does a steered persona outlast the steering?

For each prompt the model generates ``N`` tokens with runtime steering at layer ``L`` (positions
all), then ``M`` more from the same KV cache without steering. At every generated token it records
the scalar projection ``(h . v) / |v|`` of the hidden state at row ``L`` (the output of block
``L-1``, as the next block reads it, so it includes the steering term while steering is on) onto
the vector ``v = v[L]``. One forward call per new token; the sequence is never re-traced.

Token ``t`` is recorded at the position that produced it: the first generated token's projection
is the hidden state at the last prompt position, token ``t``'s at the position of token ``t-1``.
So the ``N`` steered tokens are exactly those sampled from steered hidden states, and a full
forward pass over the final sequence with steering on positions ``< P + N - 1`` reproduces every
recorded number.

Reference traces in the same run, with the same random numbers: the unsteered model throughout,
the model steered throughout and, optionally, a baked checkpoint loaded with plain transformers.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from bakery.steering.generation import encode_prompts, eos_token_ids, render_chat
from bakery.steering.hooks import Steering, SteeringTerm, blocks_of
from bakery.vectors.artifact import VectorArtifact, VectorError, describe_layer

UNSTEERED, SWITCH, STEERED, BAKED = "unsteered", "steer-then-free", "steered", "baked"
CONDITIONS = (UNSTEERED, SWITCH, STEERED, BAKED)
DEFAULT_PROMPTS = (
    "How do I cook rice?",
    "Tell me about the weather today.",
    "What should I do on a free afternoon?",
    "Explain how a bicycle works.",
)


@dataclass
class PersistSettings:
    """What one persistence run does (the layer is row ``L`` = output of block ``L-1``)."""

    layer: int
    coef: float
    steer_tokens: int
    sample_tokens: int
    temperature: float = 0.7
    seeds: tuple[int, ...] = (0,)
    suppress_eos: bool = True
    system: str | None = None
    batch_size: int = 8

    def validate(self) -> None:
        for name, value in (("steer-tokens", self.steer_tokens), ("sample-tokens", self.sample_tokens)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"--{name} must be a positive number of tokens; got {value}")
        if self.temperature < 0 or not math.isfinite(self.temperature):
            raise ValueError(f"--temperature must be 0 (greedy) or positive; got {self.temperature}")
        if not self.seeds:
            raise ValueError("give at least one seed")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be positive; got {self.batch_size}")
        if not math.isfinite(self.coef):
            raise ValueError(f"--coef must be a finite number; got {self.coef}")

    @property
    def total_tokens(self) -> int:
        return self.steer_tokens + self.sample_tokens


@dataclass
class Trace:
    """One generated continuation and its per-token projections (``None`` after end of sequence)."""

    condition: str
    prompt_index: int
    prompt: str
    seed: int
    steered_tokens: int  # how many of the first generated tokens were sampled under runtime steering
    token_ids: list[int]
    tokens: list[str]
    projection: list[float | None]
    injected: list[float]  # projection of the steering term itself: coef*|v| while on, else 0
    text_steered_phase: str = ""
    text_free_phase: str = ""

    @property
    def own(self) -> list[float | None]:
        """Projection minus the steering term: what the model itself puts along ``v``."""
        return [None if p is None else p - i for p, i in zip(self.projection, self.injected)]


@dataclass
class PersistResult:
    settings: PersistSettings
    info: dict[str, Any]
    traces: list[Trace]
    summary: dict[str, Any] = field(default_factory=dict)


# ---- validation ----------------------------------------------------------------------------------

def check_vector_for_persist(vec: VectorArtifact, config: Any, layer: int) -> torch.Tensor:
    """The row ``v[L]`` after checking shape and layer; the post-norm last row is refused."""
    vec.check_model(config)
    vec.check_layer(layer)
    if layer == vec.num_layers:
        raise VectorError(
            f"layer {layer} is the last row, taken after the final norm: the output of block "
            f"{layer - 1} is not that hidden state, so its projection is not defined. Choose a "
            f"layer in 1..{layer - 1}."
        )
    row = vec.row(layer)
    if float(row.norm()) == 0.0:
        raise VectorError(f"row {layer} of the vector is all zeros: nothing to project onto or steer with")
    return row


# ---- tracing -------------------------------------------------------------------------------------

class _LastPositionProjection:
    """Forward hook on block ``L-1`` recording ``(h . v)/|v|`` at the last position of each call.

    Registered after the steering hook, so it sees the output as the next block reads it.
    """

    def __init__(self, block: torch.nn.Module, direction: torch.Tensor):
        self.unit = (direction.float() / direction.float().norm())
        self.value: torch.Tensor | None = None
        self.handle = block.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        self.value = h[:, -1].float() @ self.unit.to(h.device)

    def remove(self) -> None:
        self.handle.remove()


def logits_kwargs(model) -> dict[str, int]:
    """``logits_to_keep=1`` where the model takes it: only the last position's logits are used."""
    import inspect

    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


def _sample(logits: torch.Tensor, temperature: float, gen: torch.Generator) -> torch.Tensor:
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    return torch.multinomial(probs.cpu(), 1, generator=gen).squeeze(-1).to(logits.device)


@dataclass
class BatchTrace:
    """Raw result of :func:`trace_batch` for one left-padded batch."""

    sequences: torch.Tensor  # [B, P + T] ids (prompt left-padded)
    attention_mask: torch.Tensor  # [B, P]: the prompt's padding mask
    prompt_len: int  # P (padded)
    projection: torch.Tensor  # [B, T] float32, NaN after end of sequence
    alive: torch.Tensor  # [B, T] bool: token t is part of the answer


@torch.no_grad()
def trace_batch(model, tok, texts: Sequence[str], *, layer: int, direction: torch.Tensor,
                coef: float, steer_tokens: int, total_tokens: int, temperature: float = 0.0,
                seed: int = 0, suppress_eos: bool = True, progress=None) -> BatchTrace:
    """Generate ``total_tokens`` for rendered prompts, steering the first ``steer_tokens`` of them.

    Uses the KV cache: one forward call per new token. ``steer_tokens=0`` never steers (also the
    right setting for a baked checkpoint); ``steer_tokens >= total_tokens`` steers throughout.
    """
    from transformers import DynamicCache

    device = model.device
    enc = encode_prompts(tok, texts).to(device)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    B, P = ids.shape
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.config)
    gen = torch.Generator().manual_seed(int(seed))
    eos = torch.tensor(eos_token_ids(model, tok) or [-1], device=device)
    pad = tok.pad_token_id if tok.pad_token_id is not None else int(eos[0])
    block = blocks_of(model)[layer - 1]
    extra = logits_kwargs(model)

    proj = torch.full((B, total_tokens), float("nan"))
    alive_at = torch.zeros((B, total_tokens), dtype=torch.bool)
    alive = torch.ones(B, dtype=torch.bool, device=device)
    full_mask = mask.long()
    step_ids, step_pos = ids, positions
    out_ids = [ids]
    for t in range(total_tokens):
        steering = (Steering(model, [SteeringTerm(layer, direction, coef)])
                    if t < steer_tokens else contextlib.nullcontext())
        with steering:
            cap = _LastPositionProjection(block, direction)  # after the steering hook
            try:
                out = model(input_ids=step_ids, attention_mask=full_mask, position_ids=step_pos,
                            past_key_values=cache, use_cache=True, **extra)
            finally:
                cap.remove()
        logits = out.logits[:, -1].float()
        if suppress_eos:
            logits[:, eos[eos >= 0]] = float("-inf")
        nxt = _sample(logits, temperature, gen)
        nxt = torch.where(alive, nxt, torch.full_like(nxt, pad))
        alive_at[:, t] = alive.cpu()
        proj[:, t] = torch.where(alive.cpu(), cap.value.cpu(), torch.tensor(float("nan")))
        if not suppress_eos:
            alive = alive & ~torch.isin(nxt, eos)
        out_ids.append(nxt.unsqueeze(1))
        step_ids = nxt.unsqueeze(1)
        step_pos = step_pos[:, -1:] + 1
        full_mask = torch.cat([full_mask, torch.ones((B, 1), dtype=full_mask.dtype, device=device)], 1)
        if progress is not None:
            progress.update(1)
    return BatchTrace(torch.cat(out_ids, 1).cpu(), mask.cpu(), P, proj, alive_at)


def _batches(items: Sequence, size: int) -> Iterable[tuple[int, Sequence]]:
    for i in range(0, len(items), size):
        yield i, items[i:i + size]


def run_condition(model, tok, prompts: Sequence[str], settings: PersistSettings, *,
                  condition: str, direction: torch.Tensor, vector_norm: float,
                  progress=None) -> list[Trace]:
    """Traces of one condition for every prompt and seed."""
    N, T = settings.steer_tokens, settings.total_tokens
    steer_tokens = {UNSTEERED: 0, SWITCH: N, STEERED: T, BAKED: 0}[condition]
    texts = [render_chat(tok, p, settings.system) for p in prompts]
    injected_value = settings.coef * vector_norm
    traces: list[Trace] = []
    for seed in settings.seeds:
        for start, chunk in _batches(texts, settings.batch_size):
            bt = trace_batch(model, tok, chunk, layer=settings.layer, direction=direction,
                             coef=settings.coef, steer_tokens=steer_tokens, total_tokens=T,
                             temperature=settings.temperature, seed=seed,
                             suppress_eos=settings.suppress_eos, progress=progress)
            for j in range(len(chunk)):
                gen_ids = bt.sequences[j, bt.prompt_len:].tolist()
                alive = bt.alive[j].tolist()
                kept = [i for i, a in zip(gen_ids, alive) if a]
                traces.append(Trace(
                    condition=condition, prompt_index=start + j, prompt=prompts[start + j],
                    seed=int(seed), steered_tokens=steer_tokens,
                    token_ids=kept, tokens=[tok.decode([i]) for i in kept],
                    projection=[None if not a else float(p) for p, a in zip(bt.projection[j].tolist(), alive)][:len(kept)],
                    injected=[injected_value if t < steer_tokens else 0.0 for t in range(len(kept))],
                    text_steered_phase=tok.decode(kept[:N], skip_special_tokens=True),
                    text_free_phase=tok.decode(kept[N:], skip_special_tokens=True),
                ))
    return traces


# ---- summary -------------------------------------------------------------------------------------

def _mean_curve(traces: Sequence[Trace], length: int, own: bool) -> list[float | None]:
    """Per-token mean over traces (``None`` where no trace reaches that token)."""
    out: list[float | None] = []
    for t in range(length):
        vals = [(tr.own if own else tr.projection)[t] for tr in traces if t < len(tr.projection)]
        vals = [v for v in vals if v is not None]
        out.append(sum(vals) / len(vals) if vals else None)
    return out


def _mean(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def _smooth(values: Sequence[float | None], window: int) -> list[float | None]:
    out: list[float | None] = []
    for i in range(len(values)):
        out.append(_mean(values[max(0, i - window + 1):i + 1]))
    return out


def half_life(free_curve: Sequence[float | None], baseline: float, start_excess: float,
              window: int = 3) -> int | None:
    """Free-phase tokens until the (trailing-mean) excess over ``baseline`` first falls to half of
    ``start_excess``; 0 means at the first free token, ``None`` never within the phase or no excess."""
    if start_excess is None or start_excess <= 0:
        return None
    for k, v in enumerate(_smooth(free_curve, window)):
        if v is not None and v - baseline <= start_excess / 2:
            return k
    return None


PRE_SWITCH_WINDOW = 8


def _half_life_note(value: int | None, start: float, sample_tokens: int) -> str:
    if start <= 0:
        return "no excess over the unsteered level before the switch"
    if value is None:
        return f"not reached within {sample_tokens} free tokens"
    return f"{value} tokens"


def summarize(traces: Sequence[Trace], settings: PersistSettings, vector_norm: float) -> dict[str, Any]:
    """Mean projections per phase and condition, and the half-life of the decay after the switch."""
    N, T = settings.steer_tokens, settings.total_tokens
    by_cond: dict[str, list[Trace]] = {}
    for tr in traces:
        by_cond.setdefault(tr.condition, []).append(tr)
    conditions: dict[str, Any] = {}
    curves: dict[str, dict[str, list[float | None]]] = {}
    for cond, trs in by_cond.items():
        raw, own = _mean_curve(trs, T, own=False), _mean_curve(trs, T, own=True)
        curves[cond] = {"projection": raw, "own": own}
        conditions[cond] = {
            "traces": len(trs),
            "mean_projection_steered_phase": _mean(raw[:N]),
            "mean_projection_free_phase": _mean(raw[N:]),
            "mean_own_steered_phase": _mean(own[:N]),
            "mean_own_free_phase": _mean(own[N:]),
            "tokens_recorded": sum(sum(p is not None for p in tr.projection) for tr in trs),
        }
    summary: dict[str, Any] = {
        "layer": settings.layer, "layer_meaning": describe_layer(settings.layer),
        "coef": settings.coef, "steer_tokens": N, "sample_tokens": settings.sample_tokens,
        "vector_norm": vector_norm, "steering_term_projection": settings.coef * vector_norm,
        "conditions": conditions,
    }
    if UNSTEERED in curves and SWITCH in curves:
        # the decay is towards the unsteered model in the same token slots, starting from the
        # level just before the switch (the steered phase ramps up from the prompt)
        base = _mean(curves[UNSTEERED]["projection"][N:])
        sw = curves[SWITCH]
        w = min(PRE_SWITCH_WINDOW, N)
        free = sw["own"][N:]
        levels = (_mean(sw["projection"][N - w:N]), _mean(sw["own"][N - w:N]), _mean(free))
        if base is None or None in levels:  # every answer ended before a phase: nothing to compare
            summary["curves"] = curves
            summary["half_life_note"] = "not computed: answers ended early (try --suppress-eos)"
            return summary
        start_raw, start_own, free_excess = (x - base for x in levels)
        hl, own_hl = half_life(free, base, start_raw), half_life(free, base, start_own)
        summary.update({
            "unsteered_level": base,
            "pre_switch_tokens": w,
            "pre_switch_excess": start_raw,
            "pre_switch_own_excess": start_own,
            "free_phase_excess": free_excess,
            # the projection drops by the steering term at the switch: this half-life is of the
            # whole excess; the next one of what the model itself keeps along v
            "half_life_tokens": hl,
            "own_half_life_tokens": own_hl,
            "own_half_life_note": _half_life_note(own_hl, start_own, settings.sample_tokens),
            "own_retention": free_excess / start_own if start_own > 0 else None,
        })
        if STEERED in curves:
            held = _mean(curves[STEERED]["own"][N:])
            held = None if held is None else held - base
            summary["steered_throughout_free_phase_own_excess"] = held
            summary["own_retention_vs_steered"] = free_excess / held if held and held > 0 else None
    summary["curves"] = curves
    return summary


# ---- the whole run -------------------------------------------------------------------------------

def run_persist(prompts: Sequence[str], settings: PersistSettings, *, vector_path: str | os.PathLike,
                model: str | os.PathLike | None = None, export: str | os.PathLike | None = None,
                trust_remote_code: bool = False, progress: bool = True) -> PersistResult:
    """Trace every condition for every prompt and seed; see the module docstring."""
    from tqdm.auto import tqdm

    from bakery.models import load_model, load_tokenizer, resolve_model
    from bakery.vectors.artifact import load_vector

    settings.validate()
    prompts = [p for p in prompts if p.strip()]
    if not prompts:
        raise ValueError("no prompts: give --prompts FILE (one per line), --recipe or --prompt TEXT")
    if not Path(vector_path).is_file():  # fail before loading any model
        raise VectorError(f"vector file not found: {vector_path}")
    path = resolve_model(model)
    export_path = resolve_model(export) if export is not None else None
    lm = load_model(path, trust_remote_code=trust_remote_code)
    tok = load_tokenizer(path, trust_remote_code=trust_remote_code)
    vec = load_vector(vector_path, num_layers=lm.config.num_hidden_layers)
    direction = check_vector_for_persist(vec, lm.config, settings.layer)
    if export_path is not None:
        from transformers import AutoConfig

        vec.check_model(AutoConfig.from_pretrained(export_path, trust_remote_code=trust_remote_code))
    norm = float(direction.norm())
    conds = [UNSTEERED, SWITCH, STEERED] + ([BAKED] if export_path else [])
    steps = len(conds) * len(settings.seeds) * math.ceil(len(prompts) / settings.batch_size) * settings.total_tokens
    traces: list[Trace] = []
    with tqdm(total=steps, desc="persist", unit="tok", disable=not progress) as bar:
        for cond in (UNSTEERED, SWITCH, STEERED):
            traces += run_condition(lm, tok, prompts, settings, condition=cond, direction=direction,
                                    vector_norm=norm, progress=bar)
        if export_path is not None:
            del lm
            baked = load_model(export_path, trust_remote_code=trust_remote_code)
            btok = (load_tokenizer(export_path, trust_remote_code=trust_remote_code)
                    if (Path(export_path) / "tokenizer_config.json").is_file() else tok)
            # the bake's own trace: plain transformers, no hook; its steering term is assumed to be
            # coef * v at this layer (exact for a bias bake) when computing the "own" component
            bt = run_condition(baked, btok, prompts, settings, condition=BAKED, direction=direction,
                               vector_norm=norm, progress=bar)
            for tr in bt:
                tr.injected = [settings.coef * norm] * len(tr.injected)
            traces += bt
    info = {"model": str(path), "vector": str(vector_path), "trait": vec.trait,
            "export": str(export_path) if export_path else None,
            "layer_meaning": describe_layer(settings.layer)}
    result = PersistResult(settings, info, traces)
    result.summary = summarize(traces, settings, norm)
    return result


def load_result(path: str | os.PathLike) -> PersistResult:
    """Read back a ``traces.json`` written by :func:`write_outputs` (summary recomputed)."""
    data = json.loads(Path(path).read_text())
    st = data["settings"]
    settings = PersistSettings(**{**st, "seeds": tuple(st["seeds"])})
    traces = [Trace(**{k: v for k, v in tr.items() if k != "own"}) for tr in data["traces"]]
    result = PersistResult(settings, data["info"], traces)
    result.summary = summarize(traces, settings, data["summary"]["vector_norm"])
    return result


# ---- prompts -------------------------------------------------------------------------------------

def read_prompts(path: str | os.PathLike) -> list[str]:
    """Prompts from a text file (one per line, ``#`` comments), a JSON list, or a YAML list."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"prompts file not found: {p}")
    text = p.read_text(encoding="utf-8")
    if p.suffix.lower() in (".json", ".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text)
        if isinstance(data, dict):
            data = data.get("prompts", data.get("eval_questions", data.get("questions")))
        if not isinstance(data, list) or not all(isinstance(x, str) for x in data):
            raise ValueError(f"{p} must hold a list of prompt strings (or a 'prompts' key with one)")
        prompts = [x.strip() for x in data]
    else:
        prompts = [ln.strip() for ln in text.splitlines()]
        prompts = [ln for ln in prompts if ln and not ln.startswith("#")]
    if not prompts:
        raise ValueError(f"{p} holds no prompts")
    return prompts


def recipe_questions(path_or_name: str) -> list[str]:
    """The eval questions of a trait recipe (a YAML file or a name in recipes/traits/)."""
    from bakery.extraction.recipes import load_trait_recipe

    questions = list(load_trait_recipe(path_or_name).eval_questions)
    if not questions:
        raise ValueError(f"trait recipe {path_or_name} has no eval questions")
    return [str(q) for q in questions]


# ---- outputs -------------------------------------------------------------------------------------

def write_outputs(result: PersistResult, outdir: str | os.PathLike, *, force: bool = False) -> Path:
    """``traces.json``, ``traces.csv``, ``texts.md``, ``summary.json`` and ``persist.png`` in
    ``outdir``, written to a temporary folder first and moved into place at the end. A non-empty
    ``outdir`` is replaced only with ``force``, and only if it is a previous persist output."""
    from bakery.io.checkpoint import atomic_folder

    out = Path(outdir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not force:
            raise FileExistsError(f"{out} exists and is not empty; choose another -o or pass --force")
        if not (out / "summary.json").is_file():
            raise FileExistsError(f"{out} is not a previous persist output (it has no summary.json): "
                                  "--force only replaces one. Choose another -o.")
    with atomic_folder(out, force=True) as tmp:
        s = result.settings
        summary = {k: v for k, v in result.summary.items() if k != "curves"}
        header = {"settings": asdict(s), "info": result.info}
        (tmp / "summary.json").write_text(json.dumps({**header, "summary": summary}, indent=2))
        (tmp / "traces.json").write_text(json.dumps({
            **header, "summary": result.summary,
            "traces": [{**asdict(tr), "own": tr.own} for tr in result.traces]}, indent=1))
        with open(tmp / "traces.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["condition", "prompt_index", "seed", "token_index", "phase", "steering_on",
                        "token_id", "token", "projection", "injected", "own"])
            for tr in result.traces:
                for t, (tid, piece, p, inj) in enumerate(zip(tr.token_ids, tr.tokens, tr.projection, tr.injected)):
                    w.writerow([tr.condition, tr.prompt_index, tr.seed, t,
                                "steered" if t < s.steer_tokens else "free", int(t < tr.steered_tokens),
                                tid, piece, "" if p is None else f"{p:.6g}", f"{inj:.6g}",
                                "" if p is None else f"{p - inj:.6g}"])
        (tmp / "texts.md").write_text(texts_markdown(result), encoding="utf-8")
        plot(result, tmp / "persist.png")
    return out


def texts_markdown(result: PersistResult) -> str:
    s = result.settings
    lines = [f"# Persistence texts: {result.info.get('trait')} at {describe_layer(s.layer)}, coef {s.coef:g}",
             "", f"Steered for {s.steer_tokens} tokens, then {s.sample_tokens} free. "
             "`||` marks where steering stops in the steer-then-free condition.", ""]
    by_prompt: dict[tuple[int, int], list[Trace]] = {}
    for tr in result.traces:
        by_prompt.setdefault((tr.prompt_index, tr.seed), []).append(tr)
    for (_, seed), trs in sorted(by_prompt.items()):
        lines += [f"## {trs[0].prompt} (seed {seed})", ""]
        for tr in trs:
            lines.append(f"- **{tr.condition}**: {tr.text_steered_phase} || {tr.text_free_phase}")
        lines.append("")
    return "\n".join(lines)


def format_summary(summary: dict[str, Any]) -> str:
    """A short plain-text table of the summary numbers."""
    def f(x):
        return "-" if x is None else f"{x:.3f}"

    lines = [f"{summary['layer_meaning']}, coef {summary['coef']:g}: steering term adds "
             f"{summary['steering_term_projection']:.3f} to the projection while on",
             f"{'condition':<16} {'steered phase':>14} {'free phase':>12}   (mean (h.v)/|v|)"]
    for cond in CONDITIONS:
        c = summary["conditions"].get(cond)
        if c:
            lines.append(f"{cond:<16} {f(c['mean_projection_steered_phase']):>14} "
                         f"{f(c['mean_projection_free_phase']):>12}")
    if "unsteered_level" in summary:
        hl = summary["half_life_tokens"]
        lines += [
            f"unsteered level in the free phase {f(summary['unsteered_level'])}; excess over it in the "
            f"last {summary['pre_switch_tokens']} steered tokens {f(summary['pre_switch_excess'])} "
            f"(own, steering term removed: {f(summary['pre_switch_own_excess'])}); "
            f"free-phase excess {f(summary['free_phase_excess'])}",
            f"half-life after the switch: whole excess "
            f"{'not reached within ' + str(summary['sample_tokens']) + ' tokens' if hl is None else str(hl) + ' tokens'}"
            f"; own excess {summary['own_half_life_note']}",
            f"own retention in the free phase {f(summary['own_retention'])} of the pre-switch level"
            + (f", {f(summary['own_retention_vs_steered'])} of the steered-throughout level"
               if "own_retention_vs_steered" in summary else ""),
        ]
    return "\n".join(lines)


COLORS = {UNSTEERED: "0.45", SWITCH: "tab:red", STEERED: "tab:blue", BAKED: "tab:green"}
STYLES = {UNSTEERED: "-", SWITCH: "-", STEERED: "--", BAKED: ":"}


def plot(result: PersistResult, path: str | os.PathLike) -> Path:
    """Mean traces per condition (band: min..max over prompts and seeds), switch point marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s, summ = result.settings, result.summary
    T, N = s.total_tokens, s.steer_tokens
    fig, axes = plt.subplots(2, 1, figsize=(9, 7.5), sharex=True)
    for ax, key, title in ((axes[0], "projection", "projection at the layer (as the next block reads it)"),
                           (axes[1], "own", "own component (steering term coef·|v| removed)")):
        for cond in CONDITIONS:
            trs = [tr for tr in result.traces if tr.condition == cond]
            if not trs:
                continue
            curve = summ["curves"][cond][key]
            xs = [t + 1 for t, v in enumerate(curve) if v is not None]
            ys = [v for v in curve if v is not None]
            ax.plot(xs, ys, STYLES[cond], color=COLORS[cond], lw=1.8, label=cond)
            lo, hi = [], []
            for t in range(T):
                vals = [(tr.own if key == "own" else tr.projection)[t] for tr in trs if t < len(tr.projection)]
                vals = [v for v in vals if v is not None]
                lo.append(min(vals) if vals else float("nan"))
                hi.append(max(vals) if vals else float("nan"))
            if len(trs) > 1:
                ax.fill_between(range(1, T + 1), lo, hi, color=COLORS[cond], alpha=0.12, lw=0)
        ax.axvline(N + 0.5, color="k", lw=1)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel("(h·v)/|v|")
        ax.grid(alpha=0.3)
    ymax = axes[0].get_ylim()[1]
    axes[0].text(N + 0.5, ymax, " steering off", va="top", fontsize=9)
    if summ.get("own_half_life_tokens") is not None:
        axes[1].axvline(N + 1 + summ["own_half_life_tokens"], color="tab:red", ls=":", lw=1)
        axes[1].text(N + 1 + summ["own_half_life_tokens"], axes[1].get_ylim()[0],
                     f" half-life {summ['own_half_life_tokens']}", va="bottom", fontsize=8, color="tab:red")
    axes[0].legend(fontsize=8, loc="upper right")
    axes[1].set_xlabel("generated token")
    fig.suptitle(f"{result.info.get('trait')}: {describe_layer(s.layer)}, coef {s.coef:g}, "
                 f"{N} steered + {s.sample_tokens} free tokens, T={s.temperature:g}, "
                 f"{len({tr.prompt_index for tr in result.traces})} prompts × {len(s.seeds)} seeds",
                 fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
