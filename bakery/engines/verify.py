"""``bakery verify``: does an engine load the export with the edit intact?

One module per engine, each registered in :data:`ENGINES`: :mod:`bakery.engines.transformers`,
:mod:`bakery.engines.vllm` and :mod:`bakery.engines.sglang` run the export, and
:mod:`bakery.engines.llamacpp` a ``bakery gguf`` folder (real runs; all but transformers in their
own environments). A missing engine is an error when asked for by name; under
``all`` it gives its fallback verdict (sglang: its loading rules, "rules only (not run)"; others:
"not installed"). This module runs the checks asked for, renders the verdicts (markdown table,
JSON, the model card's ``engines`` section) and says what they add up to (:func:`exit_status`):
only a real run can pass.
"""

from __future__ import annotations

import importlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

from bakery.engines.setup import Setup
from bakery.engines.verdict import RULES_ONLY, EngineNotInstalled, Verdict
from bakery.errors import BakeryError

__all__ = ["ENGINES", "ENGINE_NAMES", "Engine", "EngineNotInstalled", "RULES_ONLY", "Setup", "Verdict", "exit_status",
           "parse_verify_engines", "verdicts_markdown", "verify", "write_verdicts"]



@dataclass(frozen=True)
class Engine:
    """One engine ``bakery verify`` can check. Each field is a callable or a lazy
    ``"module:function"`` reference: ``run(setups, log=...)`` gives one :class:`Verdict` per
    setup; ``find()`` raises :class:`EngineNotInstalled` when the engine is absent (checked before
    anything runs); ``missing(setup, error)`` is the verdict then under ``all`` (default: kind
    ``not-installed``)."""

    run: str | Callable
    find: str | Callable | None = None
    missing: str | Callable | None = None
    gguf: bool = False  # runs GGUF files (a `bakery gguf` folder) rather than safetensors exports


def _resolve(ref: str | Callable) -> Callable:
    if callable(ref):
        return ref
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


def _run_transformers(setups: Sequence[Setup], log=None) -> list[Verdict]:
    from bakery.engines.transformers import verify_transformers

    return [verify_transformers(s) for s in setups]


# name -> engine, in the order verdicts are shown. Adding an engine is one line here.
ENGINES: dict[str, Engine] = {
    "transformers": Engine(_run_transformers),
    "vllm": Engine("bakery.engines.vllm:verify_vllm", find="bakery.engines.vllm:find_vllm_python"),
    "sglang": Engine("bakery.engines.sglang:verify_sglang", find="bakery.engines.sglang:find_sglang_python",
                     missing="bakery.engines.sglang:missing_verdict"),
    # runs GGUF files: a `bakery gguf` folder, or an export that holds one
    "llama.cpp": Engine("bakery.engines.llamacpp:verify_llamacpp",
                        find="bakery.engines.llamacpp:find_llamacpp_python", gguf=True),
}
ENGINE_NAMES = tuple(ENGINES)  # the built-in engines (the functions below read ENGINES itself)
# exit statuses of `bakery verify` (2 is bad input, from the CLI)
EXIT_PASS, EXIT_FAIL, EXIT_NOT_RUN = 0, 1, 3


def parse_verify_engines(value: str | Sequence[str]) -> list[str]:
    """The engines ``bakery verify --engine`` asks to check: names, ``all``, or a comma-separated
    list (default all). Not the baker's ``--target-engine`` (:func:`bakery.bakers.request.parse_engines`)."""
    items = [value] if isinstance(value, str) else list(value)
    out: list[str] = []
    for item in items:
        for e in str(item).split(","):
            e = e.strip().lower()
            if not e:
                continue
            if e == "all":
                out.extend(ENGINES)
            elif e in ENGINES:
                out.append(e)
            else:
                raise ValueError(f"unknown engine '{e}': choose from {', '.join(ENGINES)} or all")
    return list(dict.fromkeys(out)) or list(ENGINES)


def verify(exports: Sequence[str | Path], engines: str | Sequence[str] = "all", *, model: str | None = None,
           prompts=None, max_new_tokens: int = 48, write: bool = True, log=None,
           skip_missing: bool | None = None) -> dict[str, list[Verdict]]:
    """Verdicts per export (or ``bakery gguf`` folder), keyed by the path given. A missing engine
    is an error when asked for by name, its fallback verdict under ``all`` (``skip_missing`` forces
    either); so is an engine that cannot check what was given (llama.cpp on an export without a
    GGUF, the others on a GGUF folder: kind ``not-applicable``). Every engine is looked for before
    anything runs (after the exports are read: bad input fails first)."""
    wanted = parse_verify_engines(engines)
    if skip_missing is None:
        skip_missing = engines == "all" or (not isinstance(engines, str) and "all" in engines)
    from bakery.engines.llamacpp import setup_for

    setups = [setup_for(e, model=model, prompts=prompts, max_new_tokens=max_new_tokens) for e in exports]
    keys = [str(e) for e in exports]  # two GGUF folders of one export are two rows
    missing: dict[str, EngineNotInstalled] = {}
    for name in wanted:
        if ENGINES[name].find is not None:
            try:
                _resolve(ENGINES[name].find)()
            except EngineNotInstalled as e:
                if not skip_missing:
                    raise
                missing[name] = e
    out: dict[str, list[Verdict]] = {k: [] for k in keys}
    for name in wanted:
        eng = ENGINES[name]
        fit = [i for i, s in enumerate(setups) if _not_applicable(eng, s, keys[i]) is None]
        for i, s in enumerate(setups):
            why = _not_applicable(eng, s, keys[i])
            if why is not None:
                if not skip_missing:
                    raise BakeryError(why)
                out[keys[i]].append(Verdict(name, "not-run", why, kind="not-applicable"))
        if not fit:
            continue
        if name in missing:
            fallback = _resolve(eng.missing) if eng.missing else (
                lambda s, e, n=name: Verdict(n, "not-run", str(e), kind="not-installed"))
            verdicts = [fallback(setups[i], missing[name]) for i in fit]
        else:
            verdicts = _resolve(eng.run)([setups[i] for i in fit], log=log)
        for i, v in zip(fit, verdicts, strict=True):
            out[keys[i]].append(v)
    for k in out:
        out[k].sort(key=_order)
    if write:
        for k in keys:
            write_verdicts(Path(k), out[k])
    return out


def _not_applicable(eng: Engine, s: Setup, given: str) -> str | None:
    """Why ``eng`` cannot check what was given (None: it can). llama.cpp runs GGUF files, the
    others safetensors exports; a GGUF folder stands for the GGUF, not for its export."""
    from bakery.engines.llamacpp import GGUFFolderError, gguf_of

    is_gguf = getattr(s, "gguf", None) is not None
    if eng.gguf:
        try:
            gguf_of(s)
        except GGUFFolderError as e:
            return str(e)
        return None
    if is_gguf:
        return (f"{given} is a GGUF folder, which only llama.cpp runs: verify it with --engine llama.cpp, "
                f"and its export {s.export} with the other engines")
    return None


def _order(v: Verdict) -> int:
    names = list(ENGINES)
    return names.index(v.engine) if v.engine in names else len(names)


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
    # "not applicable" says something of the input, not of the export: not recorded
    old.update({v.engine: v.to_dict() for v in verdicts if v.kind != "not-applicable"})
    merged = sorted((Verdict.from_dict(d) for d in old.values()), key=_order)
    old = {v.engine: v.to_dict() for v in merged}  # older entries re-labelled too
    tmp = path.with_name(".verify.json.tmp")
    tmp.write_text(json.dumps(old, indent=2) + "\n")
    os.replace(tmp, path)
    note = (f"\n\nRows marked \"{RULES_ONLY}\" were read from the engine's loading rules: nothing ran "
            "there, and they are not a pass." if any(v.kind == "rules" for v in merged) else "")
    write_section(export, "engines", "## Engine verification\n\nChecked by `bakery verify`:\n\n"
                  + verdicts_markdown(merged) + note + "\n")
