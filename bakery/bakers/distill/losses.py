"""The distillation losses: ``KL(teacher || student)`` per response token, exact or from the
teacher's kept top-k."""

from __future__ import annotations

import torch


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
