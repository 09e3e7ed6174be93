"""Runtime steering over a (layer, coef) grid: how strong can the vector be before answers break?

For each cell the model answers the prompts greedily while steered (``coef * v[L]`` at the output
of block ``L-1``, at the chosen positions: all, prompt or response). Each cell is measured by:

- ``projection``: the unsteered model reads the steered answers; the mean over response tokens of
  its row-``L`` activations, projected on the unit ``v[L]`` (how much the text carries the trait);
  ``projection_base`` is the same for the unsteered answers;
- ``shift``: ``(projection - projection_base) / |v[L]|``, the fraction of the pos-neg gap of the
  extraction answers that steering moved the answers by (comparable across layers);
- ``kl``: per-token ``KL(steered || unsteered)`` on those answers, teacher-forced;
- ``distinct2``: distinct word bigrams / bigrams of the *worst* answer, a degeneration check
  ("aye, aye, aye, ..." scores low);
- ``trait`` and ``coherence``: judge scores (0-100) when a judge is configured.

The suggested cell is the strongest that stays coherent: with a judge, the highest trait score
among cells with coherence >= threshold; without one, the largest shift among cells whose every
answer has ``distinct2 >= min_distinct`` and whose ``kl <= max_kl``. The judge-free rule is a
crude proxy (it cannot tell a storyteller voice from a pirate one): configure a judge to trust it.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from bakery.placement import input_device
from bakery.errors import BakeryError
from bakery.io.folders import SWEEP, atomic_folder
from bakery.stats import mean_of
from bakery.steering.generation import generate, render_chat
from bakery.steering.hooks import steer
from bakery.naming import describe_layer
from bakery.vectors.artifact import VectorArtifact, unit

DEFAULT_PROMPTS = (
    "How do I cook rice?", "What is the capital of France?", "Tell me about your weekend.",
    "How can I learn to play the guitar?", "What should I eat for breakfast?",
    "Explain how a bicycle works.",
)


class SweepError(BakeryError):
    """A grid or option that cannot be swept."""


def parse_layers(text: str, num_layers: int) -> list[int]:
    """``"10-20"``, ``"10-20:2"`` or ``"8,12,16"`` -> steerable rows (1..num_layers-1)."""
    out: list[int] = []
    try:
        for part in text.split(","):
            part = part.strip()
            m = re.fullmatch(r"(\d+)-(\d+)(?::(\d+))?", part)
            if m:
                a, b, step = int(m[1]), int(m[2]), int(m[3] or 1)
                if a > b or step < 1:
                    raise ValueError
                out += list(range(a, b + 1, step))
            else:
                out.append(int(part))
    except ValueError:
        raise SweepError(f"cannot read layers '{text}': use A-B, A-B:STEP or A,B,C") from None
    bad = [L for L in out if not 1 <= L < num_layers]
    if bad:
        raise SweepError(f"layer(s) {bad} out of range: steerable layers are 1..{num_layers - 1} "
                         f"({describe_layer(1)} .. {describe_layer(num_layers - 1)})")
    return sorted(set(out))


def parse_coefs(text: str) -> list[float]:
    try:
        coefs = [float(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise SweepError(f"cannot read coefs '{text}': use a comma list such as 1,2,4") from None
    if not coefs:
        raise SweepError("give at least one coef")
    return coefs


def distinct2(text: str) -> float:
    words = text.lower().split()
    bigrams = list(zip(words, words[1:]))
    return len(set(bigrams)) / len(bigrams) if bigrams else 1.0


@dataclass
class Cell:
    layer: int
    coef: float
    projection: float
    projection_base: float
    shift: float
    kl: float
    distinct2: float
    trait: float | None = None
    coherence: float | None = None
    answers: list[str] = field(default_factory=list)


@dataclass
class SweepResult:
    cells: list[Cell]
    layers: list[int]
    coefs: list[float]
    prompts: list[str]
    base_answers: list[str]
    base_trait: float | None
    base_coherence: float | None
    suggested: tuple[int, float] | None
    rule: str

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["suggested"] = ({"layer": self.suggested[0], "coef": self.suggested[1],
                           "text": describe_layer(self.suggested[0])} if self.suggested else None)
        return d


@torch.no_grad()
def _teacher_forced(model, seqs: torch.Tensor, mask: torch.Tensor, P: int, layer: int,
                    direction: torch.Tensor, steer_ctx) -> tuple[list[float], float]:
    """(per-answer projection at ``layer`` read by the unsteered model, mean KL(steered||base))."""
    dev = input_device(model)
    seqs, mask = seqs.to(dev), mask.to(dev)
    base = model(input_ids=seqs, attention_mask=mask, output_hidden_states=True)
    resp = mask[:, P:].float()
    h = base.hidden_states[layer][:, P:].float()
    h = h @ direction.to(h.device)
    resp = resp.to(h.device)
    n = resp.sum(1).clamp(min=1)
    proj = ((h * resp).sum(1) / n).tolist()
    kl = float("nan")
    if steer_ctx is not None:
        with steer_ctx():
            st = model(input_ids=seqs, attention_mask=mask).logits
        pred = slice(P - 1, -1)
        lp_s = F.log_softmax(st[:, pred].float(), -1)
        lp_b = F.log_softmax(base.logits[:, pred].float(), -1)
        per_tok = (lp_s.exp() * (lp_s - lp_b)).sum(-1)
        kl = float((per_tok * resp).sum() / resp.sum().clamp(min=1))
    return proj, kl


def sweep(vector: VectorArtifact, model, tok, layers: Sequence[int], coefs: Sequence[float], *,
          prompts: Sequence[str] = DEFAULT_PROMPTS, max_new_tokens: int = 40, judge=None,
          rubric: str | None = None, coherence_threshold: float = 50.0, min_distinct: float = 0.5,
          max_kl: float = 3.0, positions: str = "all", progress: bool = True) -> SweepResult:
    """Steer over the grid and measure each cell (see module doc)."""
    from tqdm.auto import tqdm

    if judge is not None and not rubric:
        raise SweepError("a judge needs the trait's rubric: pass the trait recipe (--recipe)")
    vector.check_model(model.config)
    for L in layers:
        vector.check_layer(L, for_bake=True)
    texts = [render_chat(tok, p) for p in prompts]
    base = generate(model, tok, texts, max_new_tokens=max_new_tokens)
    base_proj: dict[int, float] = {}
    cells: list[Cell] = []
    bar = tqdm(total=len(layers) * len(coefs), desc="sweep", unit="cell", file=sys.stderr,
               disable=not progress)
    for L in layers:
        norm = float(vector.row(L).norm())
        direction = unit(vector.row(L), f"row {L} of the vector")
        bp, _ = _teacher_forced(model, base.sequences, base.attention_mask, base.prompt_len, L, direction, None)
        base_proj[L] = sum(bp) / len(bp)
        for c in coefs:
            # under generate the hooks find the prompt from the KV cache (the prefill); the
            # teacher-forced pass has no cache, so it must be told where the response starts, or
            # "response" would steer nothing and "prompt" every position
            with steer(model, vector, L, c, positions=positions):
                g = generate(model, tok, texts, max_new_tokens=max_new_tokens)
            ctx = lambda: steer(model, vector, L, c, positions=positions, prompt_len=g.prompt_len)
            proj, kl = _teacher_forced(model, g.sequences, g.attention_mask, g.prompt_len, L, direction, ctx)
            p = sum(proj) / len(proj)
            cells.append(Cell(L, c, p, base_proj[L], (p - base_proj[L]) / norm, kl,
                              min(distinct2(t) for t in g.texts), answers=g.texts))
            bar.update(1)
    bar.close()
    base_trait = base_coh = None
    if judge is not None:
        qa = [(p, a) for cell in cells for p, a in zip(prompts, cell.answers)]
        qa_base = list(zip(prompts, base.texts))
        tr = judge.trait_scores(rubric, qa + qa_base)
        co = judge.coherence_scores(qa + qa_base)
        k = len(prompts)
        for i, cell in enumerate(cells):
            cell.trait = mean_of(tr[i * k:(i + 1) * k])
            cell.coherence = mean_of(co[i * k:(i + 1) * k])
        base_trait, base_coh = mean_of(tr[-k:]), mean_of(co[-k:])
    suggested, rule = suggest(cells, judged=judge is not None, coherence_threshold=coherence_threshold,
                              min_distinct=min_distinct, max_kl=max_kl)
    return SweepResult(cells, list(layers), list(coefs), list(prompts), base.texts, base_trait,
                       base_coh, suggested, rule)


def suggest(cells: Sequence[Cell], *, judged: bool, coherence_threshold: float = 50.0,
            min_distinct: float = 0.5, max_kl: float = 3.0) -> tuple[tuple[int, float] | None, str]:
    """The strongest cell that stays coherent, and the rule used (see module doc)."""
    if judged:
        rule = f"highest judge trait score with coherence >= {coherence_threshold:g}"
        ok = [c for c in cells if c.coherence is not None and c.trait is not None
              and c.coherence >= coherence_threshold]
        key = lambda c: (c.trait, c.shift)
    else:
        rule = (f"largest shift with every answer's distinct-2 >= {min_distinct:g} and KL <= {max_kl:g}; "
                "no judge, a crude proxy")
        ok = [c for c in cells if c.distinct2 >= min_distinct and math.isfinite(c.kl) and c.kl <= max_kl]
        key = lambda c: (c.shift, -abs(c.coef))
    if not ok:
        return None, rule + ": no cell qualifies"
    best = max(ok, key=key)
    return (best.layer, best.coef), rule


def format_table(res: SweepResult) -> str:
    judged = any(c.trait is not None for c in res.cells)
    head = f"{'layer':>5} {'coef':>6} {'proj':>8} {'(base)':>8} {'shift':>6} {'KL':>7} {'dist2':>6}"
    if judged:
        head += f" {'trait':>6} {'coher':>6}"
    lines = [head]
    for c in res.cells:
        line = (f"{c.layer:>5} {c.coef:>6g} {c.projection:>8.2f} {c.projection_base:>8.2f} "
                f"{c.shift:>6.2f} {c.kl:>7.3f} {c.distinct2:>6.2f}")
        if judged:
            line += f" {_fmt(c.trait):>6} {_fmt(c.coherence):>6}"
        if res.suggested == (c.layer, c.coef):
            line += "  <- suggested"
        lines.append(line)
    if res.suggested:
        L, c = res.suggested
        lines.append(f"suggested: {describe_layer(L)}, coef {c:g} ({res.rule})")
    else:
        lines.append(f"no suggestion: {res.rule}")
    return "\n".join(lines)


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f}"


def plot(res: SweepResult, path: str | os.PathLike, title: str = "") -> Path:
    """PNG heatmaps (layers x coefs) of each measure, the suggested cell boxed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    measures = [("shift", "shift (fraction of pos-neg gap)"), ("kl", "KL(steered || base)"),
                ("distinct2", "distinct-2 (worst answer)")]
    if any(c.trait is not None for c in res.cells):
        measures += [("trait", "judge trait"), ("coherence", "judge coherence")]
    idx = {(c.layer, c.coef): c for c in res.cells}
    fig, axes = plt.subplots(1, len(measures), figsize=(3.2 * len(measures) + 0.5, 0.45 * len(res.layers) + 2.2),
                             dpi=110, squeeze=False)
    for ax, (key, label) in zip(axes[0], measures):
        grid = torch.tensor([[float("nan") if getattr(idx[(L, c)], key) is None else getattr(idx[(L, c)], key)
                              for c in res.coefs] for L in res.layers])
        im = ax.imshow(grid.numpy(), aspect="auto", cmap="viridis")
        ax.set_xticks(range(len(res.coefs)), [f"{c:g}" for c in res.coefs])
        ax.set_yticks(range(len(res.layers)), [str(L) for L in res.layers])
        ax.set_xlabel("coef")
        ax.set_ylabel("layer (row L = output of block L-1)")
        ax.set_title(label, fontsize=9)
        for i in range(len(res.layers)):
            for j in range(len(res.coefs)):
                v = grid[i, j].item()
                if math.isfinite(v):
                    ax.text(j, i, f"{v:.2g}", ha="center", va="center", fontsize=7, color="w")
        if res.suggested:
            i, j = res.layers.index(res.suggested[0]), res.coefs.index(res.suggested[1])
            ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, ec="red", lw=2))
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(title or "steering sweep", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def save(res: SweepResult, folder: str | os.PathLike, title: str = "", *,
         force: bool = False) -> dict[str, Path]:
    """``sweep.json`` (every cell with its answers) and ``sweep.png``, written atomically.

    ``folder`` must be missing, empty, or (with ``force``) a previous sweep's, holding nothing
    else (the overwrite rule of ``bakery.io.folders``).
    """
    folder = Path(folder)
    with atomic_folder(folder, kind=SWEEP, force=force) as tmp:
        (tmp / "sweep.json").write_text(json.dumps(res.to_dict(), indent=2, ensure_ascii=False))
        plot(res, tmp / "sweep.png", title)
    return {"json": folder / "sweep.json", "plot": folder / "sweep.png"}
