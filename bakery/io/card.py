"""The export's model card: Hub YAML front matter and the body written by the baker.

The body is one named section (``bakery:bake``) written through
:func:`bakery.io.card_sections.write_section`, so the sections that ``compare`` and ``verify`` add
later survive a re-render.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from bakery.arch import auto_class
from bakery.io.card_sections import write_section
from bakery.io.manifest import Manifest
from bakery.naming import describe_layer

SECTION = "bake"
_FRONT = re.compile(r"\A---\n.*?\n---\n", re.S)


def front_matter(m: Manifest) -> dict[str, Any]:
    """Hub metadata: base model, relation, library, tags, inherited license."""
    src = m.source
    fm: dict[str, Any] = {}
    base = src.get("hub_id")
    if base:
        fm["base_model"] = base
        fm["base_model_relation"] = "finetune"
    fm["library_name"] = "transformers"
    tags = ["bakery", "steering", "persona-vector", f"bakery-{m.method}"]
    tags += [f"trait:{t}" for t in dict.fromkeys(t.trait for t in m.terms)]
    if m.method.startswith("kl-"):
        tags.append("distillation")
    fm["tags"] = tags
    fm["license"] = src.get("license") or "other"
    return fm


def _sglang_line(path: str, m: Manifest) -> str:
    flag = m.engines.get("sglang", "ok")
    extra = f" {flag}" if flag not in ("ok", "drop") else ""
    return f"python -m sglang.launch_server --model-path {path}{extra}"


def body(m: Manifest, path: str, auto: str = "AutoModelForCausalLM") -> str:
    """Markdown for what was baked, how to load it and how to reproduce it."""
    traits = ", ".join(dict.fromkeys(t.trait for t in m.terms))
    base = m.source.get("hub_id") or m.source.get("model")
    lines = [f"# {traits} baked into {base} ({m.method}{', ' + m.route if m.route else ''})", ""]
    if m.method == "ortho":
        a = m.ablation or {}
        lines.append(
            f"The direction {a.get('direction')} ({describe_layer(int(a.get('layer', 0)))}) of the "
            f"'{traits}' vector is projected out of every write into the residual stream (blocks: "
            f"{a.get('blocks')}, embeddings: {a.get('embeddings')}). It stands for runtime "
            "ablation (`bakery.steering.hooks.Ablation`).")
        if a.get("add"):
            lines.append(f"Then {a['add']:g} x the unit direction is added back at the output of "
                         f"block {m.terms[0].block} (affine edit).")
    else:
        lines.append(f"This checkpoint behaves like the base model with runtime steering at "
                     f"positions={m.positions}: no hooks are needed at inference.")
    lines += ["", "| trait | layer | coef | vector sha256 |", "| --- | --- | --- | --- |"]
    for t in m.terms:
        where = (f"row {t.layer}, after the attention of block {t.layer}" if m.site == "attn-out"
                 else describe_layer(t.layer))
        coef = "-" if t.coef is None else f"{t.coef:g}"
        lines.append(f"| {t.trait} | {where} | {coef} | "
                     f"`{t.vector_sha256[:12]}` ([{t.vector_file}]({t.vector_file})) |")
    lines += ["", f"- route: `{m.route}`, site: `{m.site}`, exact: **{str(m.exact).lower()}**"
              + (" (matches the runtime reference up to storage rounding)" if m.exact else
                 " (approximate: measure it with `bakery compare`)"),
              f"- source: `{m.source.get('model')}` (config hash `{m.source.get('config_hash')}`)"]
    for n in m.extra.get("notes", []):
        lines.append(f"- {n}")
    for w in m.extra.get("warnings", []):
        lines.append(f"- **warning:** {w}")
    lines += ["", "## Engine support (rules only, not run: `bakery verify` runs the engines)", "", "| engine | verdict |", "| --- | --- |"]
    for e, v in m.engines.items():
        verdict = {"ok": "loads natively", "drop": "**drops the edit silently: do not use**"}.get(
            v, f"needs `{v}`")
        lines.append(f"| {e} | {verdict} |")
    lines += [
        "", "## Use it", "", "transformers:", "", "```python",
        f"from transformers import {auto}, AutoTokenizer",
        f'model = {auto}.from_pretrained("{path}")',
        f'tok = AutoTokenizer.from_pretrained("{path}")', "```", "",
        "vLLM:", "", "```bash", f"vllm serve {path}", "```", "",
        "sglang:", "", "```bash", _sglang_line(path, m), "```",
    ]
    if m.engines.get("sglang") not in ("ok", "drop", None):
        lines += ["", f"sglang's native implementation has no place for this bias; "
                      f"`{m.engines['sglang']}` makes it load the model through transformers' code."]
    lines += ["", "## Reproduce", "", "```bash", m.command, "```", ""]
    return "\n".join(lines)


def write_card(folder: str | Path, manifest: Manifest, *, final: str | Path | None = None,
               config: Any = None, section: tuple[str, str] | None = None) -> Path:
    """Write (or re-render) the card in ``folder``; ``final`` is the path shown in usage lines.
    ``config``: the baker's typed config (its settings table); ``section``: a baker's own section."""
    folder = Path(folder)
    path = folder / "README.md"
    fm = "---\n" + yaml.safe_dump(front_matter(manifest), sort_keys=False) + "---\n"
    text = path.read_text() if path.is_file() else ""
    text = _FRONT.sub("", text, count=1)
    path.write_text(fm + ("\n" + text.lstrip("\n") if text.strip() else ""))
    cfg = folder / "config.json"
    auto = auto_class(json.loads(cfg.read_text())) if cfg.is_file() else "AutoModelForCausalLM"
    out = write_section(folder, SECTION, body(manifest, str(final or folder), auto))
    if config is not None:
        rows = ["## Settings", "", f"Every option of `--method {manifest.method}` "
                "(`default`: not given, the baker's default was used).", "",
                "| option | value |", "| --- | --- |"]
        rows += [f"| {k} | {v} |" for k, v in config.card_rows()]
        out = write_section(folder, "settings", "\n".join(rows))
    if section is not None:
        out = write_section(folder, *section)
    return out
