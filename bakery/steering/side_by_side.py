"""Library side of ``bakery steer``: the same prompts with and without runtime steering."""

from __future__ import annotations

from typing import Sequence

from bakery.steering.generation import generate, render_chat
from bakery.models import load_model, load_tokenizer, resolve_model
from bakery.steering.hooks import steer
from bakery.vectors.load import load_vector


def steer_compare(prompts: Sequence[str], *, vector_path: str, layer: int, coef: float,
                  positions: str = "all", model: str | None = None, max_new_tokens: int = 60,
                  temperature: float = 0.0, system: str | None = None,
                  trust_remote_code: bool = False) -> list[tuple[str, str, str]]:
    """(prompt, unsteered answer, steered answer) for each prompt."""
    path = resolve_model(model)
    lm = load_model(path, trust_remote_code=trust_remote_code)
    tok = load_tokenizer(path, trust_remote_code=trust_remote_code)
    vec = load_vector(vector_path, num_layers=lm.config.num_hidden_layers)
    vec.check_model(lm.config)
    vec.check_layer(layer)
    texts = [render_chat(tok, p, system) for p in prompts]
    base = generate(lm, tok, texts, max_new_tokens=max_new_tokens, temperature=temperature)
    with steer(lm, vec, layer, coef, positions=positions):
        steered = generate(lm, tok, texts, max_new_tokens=max_new_tokens, temperature=temperature)
    return list(zip(prompts, base.texts, steered.texts))
