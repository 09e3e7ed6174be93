"""Measurements beside the KL: the projection of the residual stream onto the steering vector,
and greedy-continuation agreement."""

from __future__ import annotations

from typing import Sequence

import torch

from bakery.placement import input_device
from bakery.fidelity.metrics import ContextFactory
from bakery.steering.hooks import blocks_of


class Probe:
    """Scorer wrapper that also records the mean projection of block ``layer-1``'s output onto
    ``unit`` over response tokens."""

    def __init__(self, model, context: ContextFactory, layer: int, unit: torch.Tensor):
        self.model, self.context, self.layer, self.unit = model, context, layer, unit
        self.total, self.count = 0.0, 0

    @property
    def projection(self) -> float:
        return self.total / max(self.count, 1)

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor, mask: torch.Tensor, prompt_len: int) -> torch.Tensor:
        captured: dict[str, torch.Tensor] = {}
        block = blocks_of(self.model)[self.layer - 1]
        with self.context(prompt_len):
            # registered after the context's hooks, so it sees the edited output
            h = block.register_forward_hook(
                lambda m, a, o: captured.__setitem__("h", (o[0] if isinstance(o, tuple) else o).detach()))
            try:
                dev = input_device(self.model)
                logits = self.model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits.float().cpu()
            finally:
                h.remove()
        hid = captured["h"].float().cpu()[:, prompt_len:]
        keep = mask[:, prompt_len:].bool()
        proj = hid[keep] @ self.unit
        self.total += float(proj.sum())
        self.count += int(proj.numel())
        return logits


def greedy_answers(model, tok, prompts: Sequence[str], context: ContextFactory, n_tokens: int,
                   batch_size: int = 8) -> list[list[int]]:
    """``n_tokens`` greedy response tokens per rendered prompt, under ``context``."""
    from bakery.steering.generation import generate

    out: list[list[int]] = []
    for i in range(0, len(prompts), batch_size):
        with context(None):
            g = generate(model, tok, list(prompts[i:i + batch_size]), max_new_tokens=n_tokens, temperature=0.0)
        out.extend(g.response_ids(j) for j in range(len(g.texts)))
    return out


def greedy_agreement(ref: Sequence[Sequence[int]], cand: Sequence[Sequence[int]]) -> float:
    """Mean over prompts of the common prefix length of two greedy continuations divided by the
    longer one's length: 1 when they are identical, 0 when they differ from the first token."""
    scores = []
    for a, b in zip(ref, cand):
        n = max(len(a), len(b))
        if n == 0:
            scores.append(1.0)
            continue
        k = 0
        while k < min(len(a), len(b)) and a[k] == b[k]:
            k += 1
        scores.append(k / n)
    return sum(scores) / max(len(scores), 1)
