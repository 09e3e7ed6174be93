"""Trait recipes: what a persona vector is extracted from.

A trait recipe is a YAML file with a name, a one-paragraph description, pairs of contrastive
system prompts (``pos`` elicits the trait, ``neg`` its opposite), extraction questions and
disjoint evaluation questions, and a judge rubric with ``{question}`` and ``{answer}``
placeholders that asks for a 0-100 score. Built-in recipes live in ``bakery/recipes/traits/``; the
persona-vectors reference's JSON trait data converts into one (:mod:`bakery.extraction.recipe_import`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bakery.errors import BakeryError

FIELDS = ("name", "description", "pairs", "extract_questions", "eval_questions", "judge_rubric")
RECIPES_DIR = Path(__file__).resolve().parent / "recipes" / "traits"  # package data: in the wheel too
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]*$")


class RecipeError(BakeryError):
    """A trait recipe that is missing, malformed, or fails the schema check."""


class PromptsError(BakeryError):
    """A prompts file that is missing, malformed or empty."""


@dataclass(frozen=True)
class TraitRecipe:
    name: str
    description: str
    pairs: list[tuple[str, str]]  # (pos system prompt, neg system prompt)
    extract_questions: list[str]
    eval_questions: list[str]
    judge_rubric: str
    source: str = ""  # file it was read from, if any

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("source")
        d["pairs"] = [{"pos": p, "neg": n} for p, n in self.pairs]
        return d

    def content_hash(self) -> str:
        """Hash of everything that shapes a vector (not the file path)."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    def rubric_for(self, question: str, answer: str) -> str:
        # str.replace, not format(): a rubric may contain other braces (JSON examples).
        return self.judge_rubric.replace("{question}", question).replace("{answer}", answer)


def _norm(q: str) -> str:
    return " ".join(q.lower().split())


def validate(data: Any, *, where: str = "recipe", min_pairs: int = 1,
             min_questions: int = 1) -> list[str]:
    """Every problem with a recipe dict, as readable lines (empty when it is valid)."""
    if not isinstance(data, dict):
        return [f"{where}: the top level must be a mapping with keys {', '.join(FIELDS)}; "
                f"got {type(data).__name__}"]
    errs: list[str] = []
    missing = [k for k in FIELDS if k not in data]
    if missing:
        errs.append(f"{where}: missing field(s): {', '.join(missing)} (required: {', '.join(FIELDS)})")
    unknown = [k for k in data if k not in FIELDS]
    if unknown:
        errs.append(f"{where}: unknown field(s): {', '.join(map(str, unknown))} "
                    f"(allowed: {', '.join(FIELDS)})")
    for key in ("name", "description", "judge_rubric"):
        if key in data and (not isinstance(data[key], str) or not data[key].strip()):
            errs.append(f"{where}: '{key}' must be a non-empty string")
    name = data.get("name")
    if isinstance(name, str) and name.strip() and not NAME_RE.match(name):
        errs.append(f"{where}: name '{name}' must be lowercase letters, digits, '-' or '_' "
                    "(it names files and cache entries)")
    rubric = data.get("judge_rubric")
    if isinstance(rubric, str):
        for ph in ("{question}", "{answer}"):
            if ph not in rubric:
                errs.append(f"{where}: judge_rubric lacks the placeholder {ph}")
    pairs = data.get("pairs")
    if "pairs" in data:
        if not isinstance(pairs, list) or len(pairs) < min_pairs:
            errs.append(f"{where}: 'pairs' must be a list of at least {min_pairs} "
                        "{pos: ..., neg: ...} mappings")
        else:
            for i, p in enumerate(pairs):
                if not isinstance(p, dict) or set(p) != {"pos", "neg"}:
                    errs.append(f"{where}: pairs[{i}] must have exactly the keys pos and neg")
                    continue
                if not all(isinstance(p[k], str) and p[k].strip() for k in ("pos", "neg")):
                    errs.append(f"{where}: pairs[{i}].pos and pairs[{i}].neg must be non-empty strings")
                elif _norm(p["pos"]) == _norm(p["neg"]):
                    errs.append(f"{where}: pairs[{i}] has the same pos and neg prompt: no contrast")
    qsets: dict[str, list[str]] = {}
    for key in ("extract_questions", "eval_questions"):
        qs = data.get(key)
        if key not in data:
            continue
        if not isinstance(qs, list) or len(qs) < min_questions:
            errs.append(f"{where}: '{key}' must be a list of at least {min_questions} question(s)")
            continue
        bad = [i for i, q in enumerate(qs) if not isinstance(q, str) or not q.strip()]
        if bad:
            errs.append(f"{where}: {key}[{bad[0]}] is not a non-empty string")
            continue
        seen: set[str] = set()
        for q in qs:
            if _norm(q) in seen:
                errs.append(f"{where}: {key} repeats the question {q!r}")
            seen.add(_norm(q))
        qsets[key] = qs
    if len(qsets) == 2:
        overlap = {_norm(q) for q in qsets["extract_questions"]} & {_norm(q) for q in qsets["eval_questions"]}
        if overlap:
            shown = [q for q in qsets["eval_questions"] if _norm(q) in overlap][:3]
            errs.append(f"{where}: extract_questions and eval_questions must be disjoint (held-out "
                        f"evaluation); {len(overlap)} question(s) are in both, e.g. {shown}")
    return errs


def from_dict(data: Any, *, where: str = "recipe", source: str = "") -> TraitRecipe:
    errs = validate(data, where=where)
    if errs:
        raise RecipeError("invalid trait recipe:\n  " + "\n  ".join(errs))
    return TraitRecipe(
        name=data["name"].strip(), description=data["description"].strip(),
        pairs=[(p["pos"].strip(), p["neg"].strip()) for p in data["pairs"]],
        extract_questions=[q.strip() for q in data["extract_questions"]],
        eval_questions=[q.strip() for q in data["eval_questions"]],
        judge_rubric=data["judge_rubric"].strip(), source=source,
    )


def available_traits(directory: Path | None = None) -> list[str]:
    d = directory or RECIPES_DIR
    return sorted(p.stem for p in d.glob("*.yaml")) if d.is_dir() else []


def find_trait_recipe(name: str, directory: Path | None = None) -> Path:
    """The file of built-in recipe ``name`` in ``bakery/recipes/traits/`` (or ``directory``)."""
    d = directory or Path(os.environ.get("BAKERY_RECIPES", RECIPES_DIR))
    for ext in (".yaml", ".yml"):
        p = d / f"{name}{ext}"
        if p.is_file():
            return p
    have = available_traits(d)
    raise RecipeError(f"no trait recipe named '{name}' in {d}; available: "
                      f"{', '.join(have) or 'none'}. Pass a YAML file path, or write one with "
                      "`bakery recipe new`.")


def load_trait_recipe(path_or_name: str | os.PathLike) -> TraitRecipe:
    """Load and check a recipe from a YAML path, or a built-in one by name (``pirate``)."""
    import yaml

    p = Path(path_or_name).expanduser()
    if not p.is_file():
        if p.suffix in (".yaml", ".yml") or os.sep in str(path_or_name):
            raise RecipeError(f"trait recipe file not found: {p}")
        p = find_trait_recipe(str(path_or_name))
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise RecipeError(f"{p} is not valid YAML: {e}") from e
    return from_dict(data, where=str(p), source=str(p))


def dump_yaml(recipe: TraitRecipe | dict[str, Any]) -> str:
    """YAML text for a recipe, fields in schema order, long strings kept readable."""
    import yaml

    d = recipe.to_dict() if isinstance(recipe, TraitRecipe) else recipe
    ordered = {k: d[k] for k in FIELDS if k in d}

    class _Dumper(yaml.SafeDumper):
        pass

    def _str(dumper, s):
        style = "|" if "\n" in s else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", s, style=style)

    _Dumper.add_representer(str, _str)
    return yaml.dump(ordered, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=100)


# ---- prompt files -------------------------------------------------------------------------------
PROMPT_FORMATS = ("one prompt per line (# comments), a JSON or YAML list of strings (or a mapping "
                  "with a 'prompts' key), JSON lines with a 'prompt' key, or a trait recipe YAML "
                  "(its eval questions)")


def _prompt_list(data: Any, p: Path) -> list[str]:
    if isinstance(data, dict):
        if "pairs" in data and "prompts" not in data:  # a trait recipe: its held-out questions
            return list(from_dict(data, where=str(p), source=str(p)).eval_questions)
        data = data.get("prompts", data.get("eval_questions", data.get("questions")))
    if not isinstance(data, list) or not all(isinstance(x, str) and x.strip() for x in data):
        raise PromptsError(f"{p} must hold a list of non-empty prompt strings (or a 'prompts' key "
                           "with one)")
    return [x.strip() for x in data]


def read_prompts(path: str | os.PathLike) -> list[str]:
    """Prompts from a file: one prompt per line (``#`` comments and blank lines skipped), a JSON
    or YAML list of strings (or a mapping with a ``prompts`` key), JSON lines (``.jsonl``: objects
    with a ``prompt`` key, or strings), or a trait recipe YAML (its eval questions)."""
    p = Path(path)
    if not p.is_file():
        raise PromptsError(f"prompts file not found: {p}")
    text = p.read_text(encoding="utf-8")
    suffix = p.suffix.lower()
    if suffix in (".json", ".yaml", ".yml"):
        import yaml

        try:
            data = json.loads(text) if suffix == ".json" else yaml.safe_load(text)
        except (ValueError, yaml.YAMLError) as e:
            raise PromptsError(f"{p} is not valid {suffix[1:].upper()}: {e}") from e
        prompts = _prompt_list(data, p)
    elif suffix == ".jsonl":
        prompts = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            try:
                obj = json.loads(line)
            except ValueError as e:
                raise PromptsError(f"{p}:{n} is not valid JSON: {e}") from e
            item = obj.get("prompt") if isinstance(obj, dict) else obj
            if not isinstance(item, str) or not item.strip():
                raise PromptsError(f"{p}:{n} has no 'prompt' string")
            prompts.append(item.strip())
    else:
        prompts = [ln.strip() for ln in text.splitlines()]
        prompts = [ln for ln in prompts if ln and not ln.startswith("#")]
    if not prompts:
        raise PromptsError(f"{p} holds no prompts; give {PROMPT_FORMATS}")
    return prompts
