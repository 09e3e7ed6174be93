"""``bakery recipe new``: write a trait recipe with an OpenAI-compatible model.

The model is asked for one JSON object with the recipe fields; the answer is parsed, checked with
the recipe schema (5 pairs, 20 + 20 disjoint questions, a rubric with both placeholders), and on
failure asked again with the list of problems, up to ``retries`` times.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Callable

from bakery.errors import BakeryError
from bakery.traits import NAME_RE, RecipeError, TraitRecipe, dump_yaml, from_dict, validate
from bakery.io.folders import TRAIT_RECIPE, atomic_files

N_PAIRS, N_QUESTIONS = 5, 20

PROMPT = """You design data for extracting a "persona vector" for the trait '{trait}' from a language model.
Trait description: {description}

Return ONE JSON object, nothing else, with exactly these keys:
- "description": one paragraph describing the trait and its opposite.
- "pairs": a list of exactly {n_pairs} objects {{"pos": ..., "neg": ...}}: "pos" is a system prompt that makes an assistant show the trait strongly; "neg" is a system prompt that makes it show the opposite (or a plain, trait-free style). Vary the wording across pairs.
- "extract_questions": exactly {n_q} varied everyday user questions on which the trait can show.
- "eval_questions": exactly {n_q} more such questions, all different from the extract questions.
- "judge_rubric": instructions for a judge model that contain the literal placeholders {{question}} and {{answer}}, describe the trait, and ask for a score from 0 (trait absent) to 100 (trait extremely strong), answered with the number only."""


class RecipeGenError(BakeryError):
    """The model did not produce a valid recipe within the allowed attempts."""


def _parse(text: str) -> Any:
    text = text.strip()
    fence = re.search(r"```(?:json)?\s*(.*?)```", text, re.S)
    if fence:
        text = fence.group(1)
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end < start:
        raise ValueError("the answer holds no JSON object")
    return json.loads(text[start:end + 1])


def generate_recipe(trait: str, description: str, *, model: str, base_url: str | None = None,
                    api_key: str | None = None, retries: int = 3, client=None,
                    log: Callable[[str], None] = lambda m: None) -> TraitRecipe:
    """Ask ``model`` for a recipe and return it once it passes the schema check."""
    import openai

    if not NAME_RE.match(trait):
        raise RecipeError(f"trait name '{trait}' must be lowercase letters, digits, '-' or '_'")
    if client is None:
        key = api_key or os.environ.get("OPENAI_API_KEY")
        base_url = base_url or os.environ.get("OPENAI_BASE_URL") or None
        if not key and base_url is None:
            raise RecipeGenError("no API key: set OPENAI_API_KEY (or pass --base-url for a local "
                                 "server that needs none)")
        client = openai.OpenAI(api_key=key or "not-needed", base_url=base_url, max_retries=3)
    messages = [{"role": "user", "content": PROMPT.format(
        trait=trait, description=description, n_pairs=N_PAIRS, n_q=N_QUESTIONS)}]
    problems: list[str] = []
    for attempt in range(1, retries + 2):
        try:
            r = client.chat.completions.create(model=model, messages=messages, temperature=0.7)
        except openai.APIError as e:
            raise RecipeGenError(f"the recipe model '{model}' at {base_url or 'the OpenAI API'} "
                                 f"failed: {e}") from e
        text = r.choices[0].message.content or ""
        try:
            data = _parse(text)
            if isinstance(data, dict):
                data = {"name": trait, **{k: v for k, v in data.items() if k != "name"}}
            problems = validate(data, where="generated recipe", min_pairs=N_PAIRS, min_questions=N_QUESTIONS)
            if isinstance(data, dict):
                for key, want in (("pairs", N_PAIRS), ("extract_questions", N_QUESTIONS),
                                  ("eval_questions", N_QUESTIONS)):
                    if isinstance(data.get(key), list) and len(data[key]) != want:
                        problems.append(f"'{key}' must have exactly {want} items, got {len(data[key])}")
        except (ValueError, json.JSONDecodeError) as e:
            problems = [f"not parseable JSON: {e}"]
        if not problems:
            return from_dict(data, where="generated recipe")
        log(f"attempt {attempt}: the answer was not a valid recipe ({'; '.join(problems)[:300]})")
        messages += [{"role": "assistant", "content": text},
                     {"role": "user", "content": "That is not a valid recipe:\n- " + "\n- ".join(problems)
                      + "\nReturn the corrected JSON object only."}]
    raise RecipeGenError(f"no valid recipe after {retries + 1} attempts; last problems: "
                         + "; ".join(problems))


def write_recipe(recipe: TraitRecipe, path: str | os.PathLike, *, force: bool = False) -> Path:
    """Write YAML atomically under the overwrite rule of ``bakery.io.folders``: an existing file
    is replaced only with ``force``, and only if it is a trait recipe."""
    path = Path(path)
    with atomic_files({path: TRAIT_RECIPE}, force=force) as tmps:
        tmps[path].write_text(dump_yaml(recipe), encoding="utf-8")
    return path
