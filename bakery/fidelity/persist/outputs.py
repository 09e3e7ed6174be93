"""The files of a persistence run: ``summary.json``, ``traces.json``, ``traces.csv``,
``texts.md`` and ``persist.png``, written as one output folder (``bakery.io.folders``)."""

from __future__ import annotations

import csv
import json
import os
from dataclasses import asdict
from pathlib import Path

from bakery.fidelity.persist.settings import (BAKED, CONDITIONS, STEERED, SWITCH, UNSTEERED, PersistResult,
                                              PersistSettings, Trace)
from bakery.fidelity.persist.summary import summarize
from bakery.io.folders import PERSIST, atomic_folder
from bakery.naming import describe_layer


def write_outputs(result: PersistResult, outdir: str | os.PathLike, *, force: bool = False) -> Path:
    """``traces.json``, ``traces.csv``, ``texts.md``, ``summary.json`` and ``persist.png`` in
    ``outdir``, written to a temporary folder first and moved into place at the end. An existing
    ``outdir`` is replaced only with ``force``, and only if it is a previous persist output."""
    out = Path(outdir)
    with atomic_folder(out, kind=PERSIST, force=force) as tmp:
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


def load_result(path: str | os.PathLike) -> PersistResult:
    """Read back a ``traces.json`` written by :func:`write_outputs` (summary recomputed)."""
    data = json.loads(Path(path).read_text())
    st = data["settings"]
    settings = PersistSettings(**{**st, "seeds": tuple(st["seeds"])})
    traces = [Trace(**{k: v for k, v in tr.items() if k != "own"}) for tr in data["traces"]]
    result = PersistResult(settings, data["info"], traces)
    result.summary = summarize(traces, settings, data["summary"]["vector_norm"])
    return result


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
