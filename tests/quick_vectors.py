"""A quick contrastive pirate direction for the embedded model, for tests that need a real
steering vector without running an extraction: mean last-prompt-token states under a pirate
system prompt minus a plain one, over four questions."""

from __future__ import annotations

from pathlib import Path

import torch

from bakery.steering.generation import encode_prompts, render_chat
from bakery.models import load_model, load_tokenizer
from bakery.vectors.artifact import VectorArtifact

QUESTIONS = ["Tell me about the weather.", "How do I cook rice?", "What is your favourite book?",
             "Describe a city."]


def contrastive_pirate(model_dir: str | Path) -> VectorArtifact:
    m, tok = load_model(model_dir), load_tokenizer(model_dir)

    def mean_last(system: str) -> torch.Tensor:
        enc = encode_prompts(tok, [render_chat(tok, q, system) for q in QUESTIONS])
        with torch.no_grad():
            hs = m(**enc, output_hidden_states=True).hidden_states
        return torch.stack([h[:, -1].mean(0) for h in hs])

    v = mean_last("You are a pirate. Always talk like a pirate, arr!") - mean_last("You are a helpful assistant.")
    return VectorArtifact(v, {"trait": "pirate", "variant": "prompt_last"})
