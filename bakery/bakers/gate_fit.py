"""The ridge fit behind every rank-one steering write (``rank1`` route, kl-full's warm start), and
the early-ended forward both use to capture the down-projection's inputs.

Rows are inputs ``a`` of an MLP down-projection; the fit finds ``u`` with ``u . a ~= scale`` where
the steering applies (``on``) and ``~= 0`` where it does not, so that ``W_down + w u^T`` adds about
``w`` exactly there. The ridge is relative: ``ridge * trace(A^T A) / dim``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class StopForward(Exception):
    """Raised by a capture hook once it has what it needs: the rest of the forward is skipped."""


def forward_until_stopped(model: nn.Module, **inputs: Any) -> None:
    """Run ``model`` for its hooks' sake; a hook raising :class:`StopForward` ends it early. No KV
    cache: nothing reads it, and a model truncated to its first blocks may have no attention layer
    to size one (Qwen3.5 cut before its first full-attention block)."""
    inputs.setdefault("use_cache", False)
    try:
        model(**inputs)
    except StopForward:
        _reshard(model)


def _reshard(model: nn.Module) -> None:
    """A forward cut short inside an FSDP unit left it holding its whole (gathered) weights, the
    module's registered parameters included: give them back their shards."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2
        return
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


class GateFit:
    """Accumulates rows, then solves for ``u`` and reports how well it gates."""

    def __init__(self) -> None:
        self.G: torch.Tensor | None = None
        self.s: torch.Tensor | None = None
        self.rows = 0
        self._acts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def add(self, a: torch.Tensor, on: torch.Tensor, scale: torch.Tensor | None = None) -> None:
        """``a`` [N, H]; ``on`` [N] bool, where the write should apply; ``scale`` [N] its size there
        (default 1). Sums stay on ``a``'s device (MPS has no float64: there, on the CPU)."""
        if a.device.type == "mps":
            a = a.cpu()
        a = a.double()
        on = on.to(a.device)
        scale = (torch.ones(a.shape[0], dtype=torch.float64, device=a.device) if scale is None
                 else scale.to(a.device).double())
        target = scale * on.double()
        G, s = a.T @ a, a.T @ target
        self.G = G if self.G is None else self.G + G
        self.s = s if self.s is None else self.s + s
        self.rows += a.shape[0]
        self._acts.append((a.float(), scale.float(), on.bool()))

    def solve(self, ridge: float = 1e-2) -> torch.Tensor:
        """``u`` (float32, on the CPU, where the checkpoint is edited)."""
        if self.G is None:
            raise ValueError("no rows to fit a gate on")
        lam = ridge * float(torch.trace(self.G)) / self.G.shape[0]
        eye = torch.eye(self.G.shape[0], dtype=self.G.dtype, device=self.G.device)
        return torch.linalg.solve(self.G + lam * eye, self.s).float().cpu()

    def values(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``u . a / scale`` for every row, and where the write applies (on the CPU)."""
        fit = torch.cat([(a @ u.to(a.device) / sc.clamp_min(1e-6)).cpu() for a, sc, _ in self._acts])
        return fit, torch.cat([o.cpu() for _, _, o in self._acts])

    def stats(self, u: torch.Tensor) -> dict:
        """``u . a / scale``: mean and spread where the write applies (``on_*``) and elsewhere
        (``off_*``, absent when it applies everywhere), and the RMS error against the target."""
        return summarize(*self.values(u))


def summarize(fit: torch.Tensor, on: torch.Tensor) -> dict:
    """Statistics of fitted values ``fit`` against the target (1 where ``on``, else 0)."""
    out = {"rows": int(fit.numel()), "on_mean": float(fit[on].mean()), "on_std": float(fit[on].std()),
           "rmse": float((fit - on.float()).pow(2).mean().sqrt())}
    if (~on).any():
        out.update(off_mean=float(fit[~on].mean()), off_std=float(fit[~on].std()))
    return out


def steered_positions(mask: torch.Tensor, P: int, positions: str) -> torch.Tensor:
    """True where steering at ``positions`` applies in a collated batch (shape of ``mask``)."""
    S = mask.shape[1]
    after = (torch.arange(S, device=mask.device) >= P).expand_as(mask)
    if positions == "all":
        return torch.ones_like(mask, dtype=torch.bool)
    return after if positions == "response" else ~after
