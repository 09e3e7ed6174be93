"""The prompt pool the teacher's trajectories start from.

A recipe's 20 extraction questions are too few to learn a behaviour that holds on new questions,
so :func:`prompt_pool` builds a larger, diverse pool offline from templates over many topics, plus
the recipe's extraction questions, a user's file and questions the model writes itself
(:func:`model_written_prompts`), with held-out questions removed.
"""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path
from typing import Iterable, Sequence

import torch

from bakery.bakers.distill.errors import TrajectoryError
from bakery.steering.generation import generate, render_chat

TOPICS = (
    "the ocean", "volcanoes", "honey bees", "the moon", "bread baking", "chess", "the Roman Empire",
    "electric cars", "coffee", "photosynthesis", "the internet", "jazz music", "mountain climbing",
    "recycling", "dinosaurs", "the human heart", "gardening", "solar power", "libraries", "trains",
    "the Amazon rainforest", "knitting", "basketball", "vaccines", "clouds", "bicycles",
    "ancient Egypt", "smartphones", "whales", "cheese making", "the stock market", "penguins",
    "earthquakes", "origami", "the printing press", "rainbows", "public speaking", "deserts",
    "birthday parties", "the violin", "owls", "city parks", "hot air balloons", "chocolate",
    "the Olympic Games", "glaciers", "robots", "lighthouses", "pizza", "the night sky",
    "camping", "museums", "tea ceremonies", "friendship", "time management", "saving energy",
    "board games", "sleep", "rivers", "coral reefs", "snowstorms", "airports", "farming",
    "poetry", "the post office", "elephants", "bridges", "running a marathon", "vegetable soup",
)
TEMPLATES = (
    "Tell me about {topic}.",
    "What is the most interesting thing about {topic}?",
    "Explain {topic} to a ten-year-old.",
    "Write a short paragraph about {topic}.",
    "Give me three facts about {topic}.",
    "Why do people care about {topic}?",
    "What would you say to someone who has never heard of {topic}?",
    "Describe {topic} in a few sentences.",
    "What are the pros and cons of {topic}?",
    "How would you teach a beginner about {topic}?",
)
GENERAL = (
    "How are you today?", "What is your name?", "Can you help me plan my week?",
    "Give me some advice for a long journey.", "What should I cook for dinner tonight?",
    "How do I start a new hobby?", "Tell me a short story.", "What is the meaning of a good life?",
    "How do I stay motivated?", "Write a short poem about the morning.",
    "What do you like to do for fun?", "Summarize the plot of a famous adventure story.",
    "How do I apologise to a friend?", "Give me tips for a job interview.",
    "What is the best advice you have ever heard?", "Describe the perfect weekend.",
)


QUESTION_REQUEST = ("Write one question that a curious person might ask an AI assistant about {topic}. "
                    "Reply with the question only.")


def _norm(text: str) -> str:
    return " ".join(text.lower().split()).rstrip("?.!")


def read_prompt_file(path: str | os.PathLike) -> list[str]:
    """Prompts from a text file (one a line; blank lines and ``#`` comments skipped) or JSONL
    (objects with a ``prompt`` key, or JSON strings)."""
    p = Path(path)
    if not p.is_file():
        raise TrajectoryError(f"prompt file not found: {p}")
    out: list[str] = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if p.suffix == ".jsonl":
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise TrajectoryError(f"{p}:{n} is not valid JSON: {e}") from e
            line = obj.get("prompt") if isinstance(obj, dict) else obj
            if not isinstance(line, str) or not line.strip():
                raise TrajectoryError(f"{p}:{n} has no 'prompt' string")
        out.append(line)
    return out


def prompt_pool(n: int | None = None, *, extra: Iterable[str] = (), exclude: Iterable[str] = (),
                seed: int = 0, templates: bool = True) -> list[str]:
    """A diverse pool of user prompts: ``extra`` (a recipe's extraction questions, a user's file)
    first, then templates over :data:`TOPICS` and :data:`GENERAL`, shuffled, deduplicated, with every
    prompt in ``exclude`` (held-out questions, compared case- and space-insensitively) left out."""
    banned = {_norm(q) for q in exclude}
    generated: list[str] = list(GENERAL)
    if templates:
        generated += [t.format(topic=topic) for t in TEMPLATES for topic in TOPICS]
    random.Random(seed).shuffle(generated)
    seen: set[str] = set()
    pool: list[str] = []
    for q in list(extra) + generated:
        k = _norm(q)
        if k in banned or k in seen:
            continue
        seen.add(k)
        pool.append(q)
    return pool if n is None else pool[:n]


_LEADS = ("question:", "q:", "sure! here's a question:", "here's a question:", "here is a question:")


def clean_question(reply: str) -> str | None:
    """The model's reply as one question (first line, quotes and a leading "Question:" or number
    removed), or None when it is not a plausible standalone question."""
    lines = [ln.strip() for ln in reply.strip().splitlines() if ln.strip()]
    if not lines:
        return None
    q = lines[0]
    if q.lower() in _LEADS and len(lines) > 1:
        q = lines[1]
    for lead in _LEADS:
        if q.lower().startswith(lead):
            q = q[len(lead):].strip()
    quoted = re.search(r'["“]([^"”]{10,})["”]?', q)
    if quoted:  # 'A curious person might ask: "What is ...?"'
        q = quoted.group(1)
    elif ":" in q:  # 'Someone might ask: What is ...?'
        q = q.rsplit(":", 1)[1]
    q = q.lstrip("0123456789.)-* ").strip().strip('"\'“”').strip()
    if not 10 <= len(q) <= 200 or not q.endswith("?") or q.count("?") > 2:
        return None
    return q


@torch.no_grad()
def model_written_prompts(model, tok, n: int, *, topics: Sequence[str] = TOPICS, exclude: Iterable[str] = (),
                          seed: int = 0, batch_size: int = 16, max_new_tokens: int = 40,
                          temperature: float = 0.9, progress: bool = True) -> list[str]:
    """Up to ``n`` distinct questions written by ``model`` itself (unsteered), one request per
    topic in turn, cleaned by :func:`clean_question`; ``exclude`` (held-out questions) never
    appears. Tries at most ``3 n`` requests and warns when fewer usable questions came back."""
    import warnings

    from tqdm.auto import tqdm

    if n <= 0:
        return []
    order = list(topics)
    random.Random(seed).shuffle(order)
    banned = {_norm(q) for q in exclude}
    out: list[str] = []
    bar = tqdm(total=n, desc="model-written prompts", unit="q", disable=not progress)
    tried = 0
    while len(out) < n and tried < 3 * n:
        k = min(batch_size, 3 * n - tried)
        asks = [render_chat(tok, QUESTION_REQUEST.format(topic=order[(tried + j) % len(order)])) for j in range(k)]
        g = generate(model, tok, asks, max_new_tokens=max_new_tokens, temperature=temperature, top_p=0.95,
                     seed=seed + tried)
        tried += k
        for text in g.texts:
            q = clean_question(text)
            if q is None or _norm(q) in banned or len(out) >= n:
                continue
            banned.add(_norm(q))
            out.append(q)
            bar.update(1)
    bar.close()
    if len(out) < n:
        warnings.warn(f"the model wrote only {len(out)} usable questions in {tried} requests (asked for "
                      f"{n}); the pool uses templates for the rest", stacklevel=2)
    return out
