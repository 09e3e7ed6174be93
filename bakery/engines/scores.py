"""Teacher-forced scores shared by the engine checks: per-row log-probs of a model in transformers,
and the gap between two engines' scores of the same rows."""

from __future__ import annotations

import torch

from bakery.errors import BakeryError
from bakery.placement import input_device

@torch.no_grad()
def tf_scores(model, rows: list[tuple[list[int], int]], context=None) -> list[dict[str, list]]:
    """Per position, unpadded: log-prob of the actual token and the top-1 token (transformers)."""
    out = []
    for seq, start in rows:
        ids = torch.tensor([seq], device=input_device(model))
        ctx = context(start) if context else None
        if ctx is not None:
            with ctx:
                logits = model(input_ids=ids).logits[0].float()
        else:
            logits = model(input_ids=ids).logits[0].float()
        lp = torch.log_softmax(logits[:-1].cpu(), -1)
        actual = lp.gather(1, ids[0, 1:, None].cpu())[:, 0]
        out.append({"logprob": [None] + actual.tolist(), "top1": [None] + lp.argmax(-1).tolist()})
    return out


def gap(a: list[dict], b: list[dict], rows: list[tuple[list[int], int]]) -> dict[str, float]:
    """Top-1 agreement and mean |log-prob gap| of the actual token, over response positions."""
    agree = total = n = 0
    worst = 0.0
    for sa, sb, (seq, start) in zip(a, b, rows):
        for t in range(start, len(seq)):
            la, lb = sa["logprob"][t], sb["logprob"][t]
            if la is None or lb is None:
                continue
            agree += int(sa["top1"][t] == sb["top1"][t])
            d = abs(la - lb)
            total += d
            worst = max(worst, d)
            n += 1
    if n == 0:
        raise BakeryError("no response positions to compare: the trajectories are empty")
    return {"top1": agree / n, "mean_abs_logprob_gap": total / n, "max_abs_logprob_gap": worst, "positions": n}
