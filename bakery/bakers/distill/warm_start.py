"""Closed-form warm start of kl-full: the steering write as a gated rank-one edit.

Adam moves each weight by about ``lr`` per step, so full fine-tuning needs hundreds of steps to
build the one large, low-rank change a steered model needs (``coef * v`` written into the
residual stream). LoRA's product ``B A`` grows such a change much faster: on the embedded model
its largest updates are rank-2 edits of the steered block's down- and output projections. The
warm start writes that change at once, before training:

    W_down <- W_down + coef * v u^T,   u = argmin sum_t (u . a_t - y_t)^2 + ridge

with ``a_t`` the down-projection's input on training trajectories and ``y_t`` = 1 where the
teacher steers (``positions``), 0 where it does not. Blocks before the steered one compute the
same in teacher and student, so ``a_t`` is exact. Training then corrects what a linear gate
cannot separate.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from bakery.arch import spec_for
from bakery.bakers.gate_fit import GateFit, StopForward, forward_until_stopped, steered_positions
from bakery.bakers.distill.trajectories import Trajectory, collate


@torch.no_grad()
def fit_gate(model: nn.Module, items: Sequence[Trajectory], pad_id: int, block: int, positions: str, *,
             ridge: float = 1e-2, batch_size: int = 8) -> dict:
    """``u`` with ``u . a ~= 1`` at steered positions and ``0`` elsewhere, ``a`` the input of block
    ``block``'s down-projection, and how well it separates them."""
    spec = spec_for(model.config)
    down = model.get_submodule(spec.blocks)[block].get_submodule(spec.mlp_out)
    gate = GateFit()
    now: dict[str, torch.Tensor] = {}

    def hook(module, args):
        keep = now["mask"].reshape(-1).bool()
        a = args[0].reshape(-1, args[0].shape[-1])[keep].double().cpu()
        now["a"] = a
        raise StopForward

    handle = down.register_forward_pre_hook(hook)
    device = next(model.parameters()).device
    try:
        for i in range(0, len(items), batch_size):
            ids, mask, P = collate(items[i:i + batch_size], pad_id)
            now["mask"] = mask
            forward_until_stopped(model, input_ids=ids.to(device), attention_mask=mask.to(device))
            gate.add(now["a"], steered_positions(mask, P, positions).reshape(-1)[mask.reshape(-1).bool()])
    finally:
        handle.remove()
    u = gate.solve(ridge)
    st = gate.stats(u)
    return {"u": u, "tokens": st["rows"], "steered_mean": st["on_mean"], "unsteered_mean": st.get("off_mean"),
            "rmse": st["rmse"]}


@torch.no_grad()
def apply_warm_start(model: nn.Module, items: Sequence[Trajectory], pad_id: int, *, vector: torch.Tensor,
                     layer: int, coef: float, positions: str, max_trajectories: int = 256) -> dict:
    """Add the gated rank-one write to block ``layer - 1``'s down-projection of ``model`` in place.

    Returns the fit statistics (for the manifest), or ``{"skipped": why}`` where the edit is not
    a plain residual write (sandwich-norm blocks rescale the MLP output)."""
    spec = spec_for(model.config)
    if spec.sandwich:
        return {"skipped": "sandwich-norm block: the MLP output is renormalised, no plain rank-one write"}
    block = layer - 1
    down = model.get_submodule(spec.blocks)[block].get_submodule(spec.mlp_out)
    if getattr(getattr(down, "weight", None), "ndim", 0) != 2:
        return {"skipped": f"block {block}'s MLP is a mixture of experts: no single down-projection to "
                "write through (training starts from the source weights)"}
    fit = fit_gate(model, list(items)[:max_trajectories], pad_id, block, positions)
    u = fit.pop("u")
    w = coef * vector.float()
    W = model.get_submodule(spec.blocks)[block].get_submodule(spec.mlp_out).weight
    if spec.conv1d:  # Conv1D stores [in, out]
        W.addr_(u.to(W), w.to(W))
    else:
        W.addr_(w.to(W), u.to(W))
    return {"block": block, **{k: round(v, 4) if isinstance(v, float) else v for k, v in fit.items()}}
