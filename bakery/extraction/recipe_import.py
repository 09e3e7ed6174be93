"""Trait data in the persona-vectors reference's JSON layout, as a bakery trait recipe.

The reference keeps each trait in two JSON files of the same shape, an extraction set
(``trait_data_extract/<trait>.json``) and a held-out evaluation set (``trait_data_eval/<trait>.json``):

- ``instruction``: a list of ``{"pos": ..., "neg": ...}`` system-prompt pairs;
- ``questions``: a list of question strings;
- ``eval_prompt``: a judge prompt template with ``{question}`` and ``{answer}`` fields
  (a Python format string: ``{{``/``}}`` stand for literal braces).

They map to a recipe's ``pairs``, ``extract_questions`` / ``eval_questions`` and ``judge_rubric``.
"""

from __future__ import annotations

import json
import os
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bakery.traits import NAME_RE, RecipeError, TraitRecipe, from_dict

KEYS = ("instruction", "questions", "eval_prompt")
FIELDS = ("question", "answer")


@dataclass
class ImportedRecipe:
    """The recipe, the files it came from, and what was changed on the way (one line each)."""

    recipe: TraitRecipe
    extract_file: Path
    eval_file: Path | None
    notes: list[str] = field(default_factory=list)


def _bad(where: str, key: str, what: str) -> RecipeError:
    return RecipeError(f"{where}: key '{key}' {what} (persona-vectors trait data holds "
                       "'instruction': [{pos, neg}, ...], 'questions': [str, ...], 'eval_prompt': str)")


def rubric_from_template(template: str, where: str = "eval_prompt") -> str:
    """The reference's ``str.format`` template as a bakery rubric (``{{`` -> ``{``); refuse a
    template that ``str.format`` could not fill with a question and an answer."""
    out = []
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as e:
        raise _bad(where, "eval_prompt", f"is not a valid template ({e})") from e
    seen = set()
    for literal, name, spec, conv in parts:
        out.append(literal)
        if name is None:
            continue
        if name not in FIELDS or spec or conv:
            raise _bad(where, "eval_prompt", f"has the placeholder {{{name}}}; only {{question}} and "
                                             "{answer} can be filled")
        seen.add(name)
        out.append("{" + name + "}")
    missing = [f"{{{f}}}" for f in FIELDS if f not in seen]
    if missing:
        raise _bad(where, "eval_prompt", f"lacks the placeholder {' and '.join(missing)}")
    return "".join(out)


def read_trait_json(path: str | os.PathLike) -> tuple[dict[str, Any], list[str]]:
    """Read and check one trait file; returns its content and the unknown keys (ignored)."""
    p = Path(path)
    if not p.is_file():
        raise RecipeError(f"trait data file not found: {p}")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except ValueError as e:
        raise RecipeError(f"{p} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise RecipeError(f"{p}: the top level must be an object with keys {', '.join(KEYS)}; got "
                          f"{type(data).__name__}")
    for key in KEYS:
        if key not in data:
            raise _bad(str(p), key, "is missing")
    pairs = data["instruction"]
    if not isinstance(pairs, list) or not pairs:
        raise _bad(str(p), "instruction", "must be a non-empty list of {\"pos\": ..., \"neg\": ...} objects")
    for i, pair in enumerate(pairs):
        if not isinstance(pair, dict) or set(pair) != {"pos", "neg"}:
            got = sorted(pair) if isinstance(pair, dict) else type(pair).__name__
            raise _bad(str(p), f"instruction[{i}]", f"must have exactly the keys pos and neg; got {got}")
        for side in ("pos", "neg"):
            if not isinstance(pair[side], str) or not pair[side].strip():
                raise _bad(str(p), f"instruction[{i}].{side}", "must be a non-empty string")
        if _norm(pair["pos"]) == _norm(pair["neg"]):
            raise _bad(str(p), f"instruction[{i}]", "has the same pos and neg prompt: no contrast")
    qs = data["questions"]
    if not isinstance(qs, list) or not qs:
        raise _bad(str(p), "questions", "must be a non-empty list of strings")
    for i, q in enumerate(qs):
        if not isinstance(q, str) or not q.strip():
            raise _bad(str(p), f"questions[{i}]", "must be a non-empty string")
    if not isinstance(data["eval_prompt"], str) or not data["eval_prompt"].strip():
        raise _bad(str(p), "eval_prompt", "must be a non-empty string")
    rubric_from_template(data["eval_prompt"], str(p))
    return data, [k for k in data if k not in KEYS]


def _norm(q: str) -> str:
    return " ".join(q.lower().split())


def _unique(qs: list[str]) -> list[str]:
    seen: set[str] = set()
    out = []
    for q in qs:
        if _norm(q) not in seen:
            seen.add(_norm(q))
            out.append(q.strip())
    return out


def find_eval_file(extract_file: Path) -> Path | None:
    """The reference's held-out file beside an extraction file: ``trait_data_extract/X.json`` ->
    ``trait_data_eval/X.json`` (None when the layout is not that or the file is absent)."""
    parent = extract_file.parent
    if "extract" not in parent.name:
        return None
    cand = parent.parent / parent.name.replace("extract", "eval") / extract_file.name
    return cand if cand.is_file() else None


def import_persona_vectors(path: str | os.PathLike, *, eval_path: str | os.PathLike | None = None,
                           name: str | None = None, description: str | None = None) -> ImportedRecipe:
    """A trait recipe from persona-vectors trait data.

    ``path`` is the extraction file; ``eval_path`` the held-out file (default: the reference's
    sibling ``trait_data_eval/<same name>.json`` when it exists). Without one, the last half of
    the questions is held out. Pairs and the judge template come from ``path``."""
    p = Path(path)
    data, unknown = read_trait_json(p)
    notes = [f"ignored unknown key(s) in {p.name}: {', '.join(map(str, unknown))}"] if unknown else []
    ev_path = Path(eval_path) if eval_path is not None else find_eval_file(p)
    extract_qs = _unique(data["questions"])
    if len(extract_qs) < len(data["questions"]):
        notes.append(f"dropped {len(data['questions']) - len(extract_qs)} repeated question(s) of {p.name}")
    if ev_path is not None:
        ev, ev_unknown = read_trait_json(ev_path)
        if ev_unknown:
            notes.append(f"ignored unknown key(s) in {ev_path.name}: {', '.join(map(str, ev_unknown))}")
        if ev["instruction"] != data["instruction"] or ev["eval_prompt"] != data["eval_prompt"]:
            notes.append(f"{ev_path.name} has other instructions or eval_prompt than {p.name}; "
                         f"the recipe keeps {p.name}'s and only takes the questions of {ev_path.name}")
        taken = {_norm(q) for q in extract_qs}
        eval_qs = [q for q in _unique(ev["questions"]) if _norm(q) not in taken]
        if len(eval_qs) < len(_unique(ev["questions"])):
            notes.append(f"dropped {len(_unique(ev['questions'])) - len(eval_qs)} held-out question(s) "
                         "that are also extraction questions")
        if not eval_qs:
            raise RecipeError(f"{ev_path}: key 'questions' has no question that is not also in {p}; "
                              "the held-out questions must differ from the extraction questions")
    else:
        if len(extract_qs) < 2:
            raise _bad(str(p), "questions", "needs at least 2 distinct questions when no evaluation "
                                            "file is given (half are held out)")
        cut = len(extract_qs) - len(extract_qs) // 2
        extract_qs, eval_qs = extract_qs[:cut], extract_qs[cut:]
        notes.append(f"no evaluation file: held out the last {len(eval_qs)} of {cut + len(eval_qs)} "
                     "questions (pass --eval FILE for the reference's trait_data_eval set)")
    trait = name or re.sub(r"[^a-z0-9_-]+", "-", p.stem.lower()).strip("-_")
    if not NAME_RE.match(trait):
        raise RecipeError(f"cannot name the trait after the file '{p.name}': pass --trait NAME "
                          "(lowercase letters, digits, '-' or '_')")
    pairs = [{"pos": x["pos"].strip(), "neg": x["neg"].strip()} for x in data["instruction"]]
    recipe = from_dict({
        "name": trait,
        "description": description or (f"Trait '{trait}', imported from persona-vectors trait data "
                                       f"({p.name}); its judge rubric describes the trait."),
        "pairs": pairs, "extract_questions": extract_qs, "eval_questions": eval_qs,
        "judge_rubric": rubric_from_template(data["eval_prompt"], str(p)),
    }, where=str(p), source=str(p))
    return ImportedRecipe(recipe, p, ev_path, notes)
