"""Fidelity of a candidate (a bake) to a reference (runtime steering or ablation).

On trajectories sampled from the steered model for held-out prompts, teacher-forced, over response
tokens: per-token ``KL(steered || candidate)``, recovered effect
``R = 1 - KL(steered || bake) / KL(steered || base)``, and top-1 agreement.

A *scorer* maps ``(input_ids, attention_mask, prompt_len)`` to logits. Scorers make a bake loaded
as its own model, a hooked model and a peft model with its adapter switched off all look alike.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Sequence

import torch
import torch.nn.functional as F

from bakery.placement import input_device
from bakery.steering.generation import generate

Scorer = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]
ContextFactory = Callable[[int | None], ContextManager]


def no_hooks(prompt_len: int | None = None) -> ContextManager:
    return contextlib.nullcontext()


def model_scorer(model, context: ContextFactory = no_hooks) -> Scorer:
    """Logits of ``model`` under ``context(prompt_len)`` (steering, ablation, adapter switch)."""

    @torch.no_grad()
    def score(ids: torch.Tensor, mask: torch.Tensor, prompt_len: int) -> torch.Tensor:
        with context(prompt_len):
            dev = input_device(model)
            return model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits.float().cpu()

    return score


@dataclass
class Trajectories:
    """Left-padded prompt + sampled response, batched as they were generated."""

    batches: list[tuple[torch.Tensor, torch.Tensor, int]] = field(default_factory=list)  # ids, mask, P
    texts: list[str] = field(default_factory=list)

    @property
    def num_response_tokens(self) -> int:
        return int(sum(m[:, p:].sum() for _, m, p in self.batches))


@torch.no_grad()
def sample_trajectories(model, tok, prompts: Sequence[str], context: ContextFactory, *,
                        max_new_tokens: int = 48, temperature: float = 1.0, top_p: float = 1.0,
                        batch_size: int = 8, seed: int = 0) -> Trajectories:
    """Sample responses from ``model`` under ``context`` (the steered reference) for rendered
    prompt texts."""
    out = Trajectories()
    for i in range(0, len(prompts), batch_size):
        chunk = list(prompts[i:i + batch_size])
        with context(None):
            g = generate(model, tok, chunk, max_new_tokens=max_new_tokens, temperature=temperature,
                         top_p=top_p, seed=seed + i)
        out.batches.append((g.sequences.cpu(), g.attention_mask.cpu(), g.prompt_len))
        out.texts.extend(g.texts)
    return out


def response_logits(logits: torch.Tensor, mask: torch.Tensor, prompt_len: int,
                    kept: int | None = None) -> torch.Tensor:
    """The logits at the positions that predict response tokens, flattened to [N, V] (row by row,
    response positions in order). Position ``t`` predicts token ``t + 1``.

    ``kept`` is how many final positions ``logits`` covers when the model ran with
    ``logits_to_keep`` (default: all of them)."""
    S = mask.shape[1]
    kept = S if kept is None else kept
    start = prompt_len - 1 - (S - kept)  # index of position prompt_len - 1 inside the kept logits
    pred = logits[:, start:kept - 1]
    keep = mask[:, prompt_len:].bool().to(pred.device)
    return pred[keep]


def response_logprobs(logits: torch.Tensor, mask: torch.Tensor, prompt_len: int,
                      kept: int | None = None) -> torch.Tensor:
    """Log-probs (float32) at the positions that predict response tokens, flattened to [N, V]:
    :func:`response_logits` through a log-softmax. Distillation's training loss uses it too."""
    return F.log_softmax(response_logits(logits, mask, prompt_len, kept).float(), dim=-1)


def kl_divergence(p_logits: torch.Tensor, q_logits: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """Per-row ``KL(softmax(p) || softmax(q))`` of [N, V] logits, in float64, accurate down to
    the differences that float32 rounding makes.

    The textbook sum ``sum p (log p - log q)`` carries an absolute error of about float64 eps times
    the entropy (1e-15), and of float32 eps (1e-7) when done in float32, which hides the KL of an
    exact bake (1e-12 and below). With ``d = p_logits - q_logits`` (exact in float64) centred so that
    ``E_p[d] = 0``, ``KL = log E_p[exp(-d)] = log1p(E_p[expm1(-d)])``, whose rounding error is
    relative to the result. Rows whose logits differ by 1 or more use the textbook sum."""
    out = []
    for a, b in zip(p_logits.split(chunk), q_logits.split(chunk)):
        a, b = a.double(), b.double()
        lp = F.log_softmax(a, dim=-1)
        p = lp.exp()
        live = p > 0
        d = torch.where(live, a - b, torch.zeros_like(a))
        d = d - (p * d).sum(-1, keepdim=True)
        small = (d.abs() * live).amax(-1) < 1.0
        precise = torch.log1p((p * torch.where(live, torch.expm1(-d.clamp(min=-1.0)), torch.zeros_like(d))).sum(-1))
        plain = (p * torch.where(live, lp - F.log_softmax(b, dim=-1), torch.zeros_like(a))).sum(-1)
        out.append(torch.where(small, precise, plain))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


@dataclass
class Fidelity:
    kl: float  # mean per-token KL(reference || candidate) over response tokens
    kl_base: float  # mean per-token KL(reference || base)
    top1: float  # fraction of response positions where candidate and reference argmax agree
    top1_base: float
    tokens: int

    @property
    def recovered(self) -> float:
        """R = 1 - KL(ref || cand) / KL(ref || base); 1 is perfect, 0 no better than base."""
        return 1.0 - self.kl / self.kl_base if self.kl_base > 0 else float("nan")

    def to_dict(self) -> dict[str, float]:
        return {"kl": self.kl, "kl_base": self.kl_base, "R": self.recovered, "top1": self.top1,
                "top1_base": self.top1_base, "tokens": self.tokens}


@torch.no_grad()
def measure(traj: Trajectories, reference: Scorer, base: Scorer,
            candidates: dict[str, Scorer]) -> dict[str, Fidelity]:
    """Teacher-forced fidelity of each candidate against the reference, with the base alongside."""
    sums = {name: [0.0, 0.0] for name in candidates}  # kl, top1
    base_kl = base_top1 = 0.0
    n = 0
    for ids, mask, P in traj.batches:
        ref = response_logits(reference(ids, mask, P), mask, P)
        ref_top = ref.argmax(-1)
        b = response_logits(base(ids, mask, P), mask, P)
        base_kl += float(kl_divergence(ref, b).sum())
        base_top1 += (b.argmax(-1) == ref_top).sum().item()
        for name, scorer in candidates.items():
            c = response_logits(scorer(ids, mask, P), mask, P)
            sums[name][0] += float(kl_divergence(ref, c).sum())
            sums[name][1] += (c.argmax(-1) == ref_top).sum().item()
        n += ref.shape[0]
    if n == 0:
        raise ValueError("the trajectories have no response tokens to compare")
    return {name: Fidelity(kl=s[0] / n, kl_base=base_kl / n, top1=s[1] / n, top1_base=base_top1 / n,
                           tokens=n)
            for name, s in sums.items()}


@torch.no_grad()
def drift(traj: Trajectories, base: Scorer, candidate: Scorer) -> float:
    """Mean per-token ``KL(base || candidate)`` over the response tokens of ``traj`` (neutral text:
    trajectories sampled from the untouched model)."""
    total, n = 0.0, 0
    for ids, mask, P in traj.batches:
        b = response_logits(base(ids, mask, P), mask, P)
        c = response_logits(candidate(ids, mask, P), mask, P)
        total += float(kl_divergence(b, c).sum())
        n += b.shape[0]
    return total / max(n, 1)
