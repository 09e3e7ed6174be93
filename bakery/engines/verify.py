"""``bakery verify``: does an engine load the export with the edit intact?

One module per engine: :mod:`bakery.engines.transformers` and :mod:`bakery.engines.vllm` run the
export (real runs); :mod:`bakery.engines.sglang` reads it against sglang's loading rules, a
verdict labelled "rules only (not run)". This module runs the checks asked for, renders the
verdicts (markdown table, JSON, the model card's ``engines`` section) and says what they add up to
(:func:`exit_status`): only a real run can pass.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping, Sequence

from bakery.engines.common import RULES_ONLY, EngineNotInstalled, Setup, Verdict

__all__ = ["ENGINE_NAMES", "EngineNotInstalled", "RULES_ONLY", "Setup", "Verdict", "exit_status",
           "parse_verify_engines", "verdicts_markdown", "verify", "write_verdicts"]

ENGINE_NAMES = ("transformers", "vllm", "sglang")
# exit statuses of `bakery verify` (2 is bad input, from the CLI)
EXIT_PASS, EXIT_FAIL, EXIT_NOT_RUN = 0, 1, 3


def parse_verify_engines(value: str | Sequence[str]) -> list[str]:
    """The engines ``bakery verify --engine`` asks to check: names, ``all``, or a comma-separated
    list (default all). Not the baker's ``--target-engine`` (:func:`bakery.bakers.base.parse_engines`)."""
    items = [value] if isinstance(value, str) else list(value)
    out: list[str] = []
    for item in items:
        for e in str(item).split(","):
            e = e.strip().lower()
            if not e:
                continue
            if e == "all":
                out.extend(ENGINE_NAMES)
            elif e in ENGINE_NAMES:
                out.append(e)
            else:
                raise ValueError(f"unknown engine '{e}': choose from {', '.join(ENGINE_NAMES)} or all")
    return list(dict.fromkeys(out)) or list(ENGINE_NAMES)


def verify(exports: Sequence[str | Path], engines: str | Sequence[str] = "all", *, model: str | None = None,
           prompts=None, max_new_tokens: int = 48, write: bool = True, log=None,
           skip_missing: bool | None = None) -> dict[str, list[Verdict]]:
    """Verdicts per export. A missing vLLM is an error when asked for by name, a
    ``not-installed`` verdict under ``all`` (``skip_missing`` forces either)."""
    from bakery.engines.sglang import verify_sglang
    from bakery.engines.transformers import verify_transformers
    from bakery.engines.vllm import find_vllm_python, verify_vllm

    wanted = parse_verify_engines(engines)
    if skip_missing is None:
        skip_missing = engines == "all" or (not isinstance(engines, str) and "all" in engines)
    setups = [Setup(e, model=model, prompts=prompts, max_new_tokens=max_new_tokens) for e in exports]
    out: dict[str, list[Verdict]] = {str(s.export): [] for s in setups}
    if "vllm" in wanted:
        try:
            find_vllm_python()
        except EngineNotInstalled as e:
            if not skip_missing:
                raise
            for s in setups:
                out[str(s.export)].append(Verdict("vllm", "not-run", str(e), kind="not-installed"))
            wanted = [w for w in wanted if w != "vllm"]
    for s in setups:
        if "transformers" in wanted:
            out[str(s.export)].append(verify_transformers(s))
        if "sglang" in wanted:
            out[str(s.export)].append(verify_sglang(s.export))
    if "vllm" in wanted:
        for s, v in zip(setups, verify_vllm(setups, log=log)):
            out[str(s.export)].append(v)
    for k in out:
        out[k].sort(key=_order)
    if write:
        for s in setups:
            write_verdicts(s.export, out[str(s.export)])
    return out


def _order(v: Verdict) -> int:
    return ENGINE_NAMES.index(v.engine) if v.engine in ENGINE_NAMES else len(ENGINE_NAMES)


def exit_status(results: Mapping[str, Sequence[Verdict]]) -> int:
    """What the verdicts add up to: 1 when any verdict fails (a run or a rule violation); else 0
    when every export passed at least one real run; else 3 (nothing failed, but for some export
    nothing ran: rules only or not installed, which is no pass)."""
    if any(v.failed for vs in results.values() for v in vs):
        return EXIT_FAIL
    if all(any(v.passed for v in vs) for vs in results.values()):
        return EXIT_PASS
    return EXIT_NOT_RUN


def verdicts_markdown(verdicts: Sequence[Verdict]) -> str:
    lines = ["| engine | verdict | launch flag | details |", "| --- | --- | --- | --- |"]
    for v in verdicts:
        msg = v.message.replace("|", "\\|").replace("\n", " ")
        flag = f"`{v.launch_flag}`" if v.launch_flag else ""
        lines.append(f"| {v.engine} | {v.label} | {flag} | {msg} |")
    return "\n".join(lines)


def verdicts_json(results: Mapping[str, Sequence[Verdict]]) -> str:
    return json.dumps({e: [v.to_dict() for v in vs] for e, vs in results.items()}, indent=2)


def write_verdicts(export: Path, verdicts: Sequence[Verdict]) -> None:
    """``compare/verify.json`` (atomic) and the ``engines`` section of the model card."""
    from bakery.io.card_sections import write_section

    folder = Path(export) / "compare"
    folder.mkdir(exist_ok=True)
    path = folder / "verify.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    old.update({v.engine: v.to_dict() for v in verdicts})
    merged = sorted((Verdict.from_dict(d) for d in old.values()), key=_order)
    old = {v.engine: v.to_dict() for v in merged}  # older entries re-labelled too
    tmp = path.with_name(".verify.json.tmp")
    tmp.write_text(json.dumps(old, indent=2) + "\n")
    os.replace(tmp, path)
    note = (f"\n\nRows marked \"{RULES_ONLY}\" were read from the engine's loading rules: nothing ran "
            "there, and they are not a pass." if any(v.kind == "rules" for v in merged) else "")
    write_section(export, "engines", "## Engine verification\n\nChecked by `bakery verify`:\n\n"
                  + verdicts_markdown(merged) + note + "\n")
