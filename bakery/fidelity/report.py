"""A comparison's outputs: the markdown table and report, the PNG plot, and the ``compare/``
folder with the ``fidelity`` section of the model card."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Sequence

from bakery.fidelity.exact import EXACT_R
from bakery.naming import describe_layer

_COLUMNS = [("R", "R", "{:.5f}"), ("kl", "KL(steered‖·)", "{:.2e}"), ("exact", "exact", None),
            ("top1", "top-1", "{:.3f}"), ("greedy_agreement", "greedy agree", "{:.3f}"),
            ("projection", "projection", "{:.2f}"), ("drift", "neutral drift", "{:.2e}"),
            ("trait", "judge trait", "{:.1f}"), ("coherence", "judge coherence", "{:.1f}")]


def _cell(v, fmt: str | None) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    return fmt.format(v) if fmt else str(v)


def markdown_table(report: dict[str, Any], only: Sequence[str] | None = None) -> str:
    rows = report["rows"]
    names = [n for n in rows if only is None or n in only]
    cols = [c for c in _COLUMNS if any(c[0] in rows[n] for n in names)]
    lines = ["| model | " + " | ".join(c[1] for c in cols) + " |",
             "| --- |" + " ---: |" * len(cols)]
    for n in names:
        lines.append(f"| {n} | " + " | ".join(_cell(rows[n].get(key), fmt) for key, _, fmt in cols) + " |")
    return "\n".join(lines)


def markdown_report(report: dict[str, Any], only: Sequence[str] | None = None) -> str:
    ref = report["reference"]
    head = (f"Reference: {ref['description']}. {len(report['prompts'])} held-out prompts "
            f"({report.get('prompt_source', 'given')}), {report['tokens']} response tokens sampled from "
            f"the reference (row \"steered\": {ref['kind']}), up to {report['max_new_tokens']} per prompt, teacher-forced; "
            f"KL(steered ‖ base) = {report['kl_steered_vs_base']:.4f} per token. R = 1 − "
            "KL(steered ‖ bake) / KL(steered ‖ base). Exact: KL(steered ‖ bake) within the KL that "
            f"float rounding of the activations and of the stored edit produces, and R ≥ {EXACT_R}. "
            "Greedy agreement: shared prefix of "
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
    from bakery.io.folders import COMPARE, atomic_folder

    export = Path(export)
    final = export / "compare"
    with atomic_folder(final, kind=COMPARE, force=True) as tmp:  # compare/ is this command's own folder
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
