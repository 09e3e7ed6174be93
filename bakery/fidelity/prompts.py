"""The prompts a comparison runs on: held-out questions (a file, a trait recipe's evaluation
questions, or built-in ones) and neutral prompts for drift."""

from __future__ import annotations

import json
from pathlib import Path

from bakery.fidelity.reference import CompareError

# Held-out prompts used when neither --prompts nor a trait recipe gives evaluation questions.
DEFAULT_PROMPTS = [
    "How do I cook rice?",
    "What should I pack for a weekend trip?",
    "Can you explain how a bicycle works?",
    "Give me some advice for a job interview.",
    "What is your favourite season and why?",
    "How can I keep my houseplants alive?",
    "Tell me about the history of bread.",
    "What is a good way to learn a new language?",
    "Describe a rainy afternoon.",
    "How do I make a cup of tea?",
    "Why is the sky blue?",
    "What makes a good friend?",
    "How should I start running?",
    "Explain what a computer does.",
    "What would you do with a free day?",
    "Recommend a hobby for the winter.",
]
# Neutral text for drift: prompts far from any persona, answered by the untouched model.
NEUTRAL_PROMPTS = [
    "What is 12 times 7?",
    "List the days of the week.",
    "Write a Python function that returns the square of a number.",
    "What is the capital of France?",
    "Translate 'good morning' into Spanish.",
    "Name three primary colours.",
    "How many minutes are in an hour?",
    "Summarise the water cycle in two sentences.",
]


def load_prompts(path: str | Path) -> list[str]:
    """Prompts from a text file (one per line), a JSON list of strings, or a trait recipe YAML
    (its evaluation questions)."""
    p = Path(path)
    if not p.is_file():
        raise CompareError(f"prompts file not found: {p}")
    if p.suffix in (".yaml", ".yml"):
        from bakery.traits import load_trait_recipe

        return list(load_trait_recipe(p).eval_questions)
    text = p.read_text(encoding="utf-8")
    if p.suffix == ".json":
        data = json.loads(text)
        if not isinstance(data, list) or not all(isinstance(x, str) and x.strip() for x in data):
            raise CompareError(f"{p} must hold a JSON list of non-empty strings")
        prompts = [x.strip() for x in data]
    else:
        prompts = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    if not prompts:
        raise CompareError(f"{p} holds no prompts (one per line, or a JSON list of strings)")
    return prompts


def recipe_for(trait: str | None):
    """The built-in trait recipe of that name, or None."""
    if not trait:
        return None
    try:
        from bakery.traits import load_trait_recipe

        return load_trait_recipe(trait)
    except Exception:
        return None


def default_prompts(trait: str | None) -> tuple[list[str], str]:
    """(prompts, where they come from): the trait recipe's evaluation questions, else built-in ones."""
    recipe = recipe_for(trait)
    if recipe is not None:
        return list(recipe.eval_questions), f"eval questions of the '{trait}' recipe"
    return list(DEFAULT_PROMPTS), "bakery's built-in held-out prompts"


def resolve_prompts(prompts, trait: str | None) -> tuple[list[str], str]:
    """``--prompts`` as given (a file, a list) or the default for ``trait``; with their source."""
    if isinstance(prompts, (str, Path)):
        return load_prompts(prompts), f"from {prompts}"
    if prompts:
        return list(prompts), "given"
    return default_prompts(trait)
