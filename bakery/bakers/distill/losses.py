"""The distillation losses: ``KL(teacher || student)`` per response token, exact or from the
teacher's kept top-k, and their sum over many rows computed a chunk of logits at a time."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def kl_per_token(teacher_lp: torch.Tensor, student_lp: torch.Tensor) -> torch.Tensor:
    """``KL(teacher || student)`` per row of [N, V] log-probs."""
    return (teacher_lp.exp() * (teacher_lp - student_lp)).sum(-1)


def kl_topk(teacher_ids: torch.Tensor, teacher_lp: torch.Tensor, student_lp: torch.Tensor) -> torch.Tensor:
    """``KL(teacher || student)`` per row, with the teacher known by its top-k and the tail mass
    ``1 - sum(top-k)``: the KL between the two distributions coarse-grained to (top-k tokens, the
    rest). It never exceeds the exact KL, and equals it as the tail mass goes to zero."""
    s_top = student_lp.gather(1, teacher_ids.to(student_lp.device))
    t_lp = teacher_lp.to(student_lp.device)
    p = t_lp.exp()
    head = (p * (t_lp - s_top)).sum(-1)
    log_t_tail = torch.log1p(-p.sum(-1).clamp(max=1 - 1e-7))
    log_s_tail = torch.log(-torch.expm1(torch.logsumexp(s_top, -1).clamp(max=-1e-7)))
    return head + log_t_tail.exp() * (log_t_tail - log_s_tail)


def chunked_kl(head: Callable[[torch.Tensor], torch.Tensor], student_h: torch.Tensor, rows: int, *,
               teacher_h: torch.Tensor | None = None,
               topk: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Summed ``KL(teacher || student)`` over the rows of [N, hidden] final hidden states, the
    logits made by ``head`` ``rows`` rows at a time: the teacher given by its hidden states
    ``teacher_h`` (exact) or by its kept ``topk`` (ids, log-probs) (:func:`kl_topk`). With
    gradients on, each chunk is recomputed in the backward pass, so no more than one chunk's
    logits exist at once."""
    if (teacher_h is None) == (topk is None):
        raise ValueError("give the teacher as exactly one of teacher_h or topk")

    def part(s: torch.Tensor, *teacher: torch.Tensor) -> torch.Tensor:
        s_lp = F.log_softmax(head(s).float(), dim=-1)
        if topk is not None:
            return kl_topk(*teacher, s_lp).sum()
        with torch.no_grad():
            t_lp = F.log_softmax(head(teacher[0]).float(), dim=-1)
        return kl_per_token(t_lp, s_lp).sum()

    total = student_h.new_zeros((), dtype=torch.float32)
    for i in range(0, student_h.shape[0], rows):
        sl = slice(i, i + rows)
        teacher = (topk[0][sl], topk[1][sl]) if topk is not None else (teacher_h[sl],)
        if torch.is_grad_enabled() and student_h.requires_grad:
            total = total + checkpoint(part, student_h[sl], *teacher, use_reentrant=False)
        else:
            total = total + part(student_h[sl], *teacher)
    return total
