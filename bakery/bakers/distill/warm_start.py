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

A mixture-of-experts block has no single down-projection: its MLP writes ``sum_e w_e W_e a_e``
over the experts the router picked (weights ``w_e``). The warm start there edits every expert,
``W_e <- W_e + coef * v u_e^T``, each ``u_e`` fitted on the tokens routed to expert ``e`` with the
target ``y_t / S_t`` (``S_t`` the token's total routing weight: 1 where the top-k weights are
normalised), so that the routed sum adds ``coef * v * y_t``. The edit sits behind the router, so
routing in that block is unchanged; experts that no training token reached stay unedited, and
a shared expert is left alone (it is not needed for the sum).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from bakery.placement import input_device
from bakery.arch import spec_for
from bakery.bakers.gate_fit import GateFit, StopForward, forward_until_stopped, steered_positions, summarize
from bakery.bakers.distill.sharding import add_outer
from bakery.bakers.distill.targets import unwrap_peft
from bakery.bakers.distill.trajectories import Trajectory, collate
from bakery.bakers.rank1 import down_module, expert_count, expert_inputs, experts_of


def _capture(model: nn.Module, items: Sequence[Trajectory], pad_id: int, module: nn.Module, positions: str,
             add, batch_size: int) -> None:
    """Run the trajectories up to ``module`` (stopping there); ``add(args, keep, on)`` gets its
    inputs, the real-token mask and where the teacher steers, per batch."""
    now: dict[str, torch.Tensor] = {}

    def hook(mod, args):
        keep = now["mask"].reshape(-1).bool()
        add(args, keep, now["on"].reshape(-1)[keep])
        raise StopForward

    handle = module.register_forward_pre_hook(hook)
    device = input_device(model)
    try:
        for i in range(0, len(items), batch_size):
            ids, mask, P = collate(items[i:i + batch_size], pad_id)
            now["mask"], now["on"] = mask, steered_positions(mask, P, positions)
            forward_until_stopped(model, input_ids=ids.to(device), attention_mask=mask.to(device))
    finally:
        handle.remove()


def _report(st: dict) -> dict:
    return {"tokens": st["rows"], "steered_mean": st["on_mean"], "unsteered_mean": st.get("off_mean"),
            "rmse": st["rmse"]}


@torch.no_grad()
def fit_gate(model: nn.Module, items: Sequence[Trajectory], pad_id: int, block: int, positions: str, *,
             ridge: float = 1e-2, batch_size: int = 8) -> dict:
    """``u`` with ``u . a ~= 1`` at steered positions and ``0`` elsewhere, ``a`` the input of block
    ``block``'s down-projection, and how well it separates them."""
    spec = spec_for(model.config)
    mod = model.get_submodule(spec.blocks)[block]
    down = mod.get_submodule(down_module(spec, mod))
    gate = GateFit()

    def add(args, keep, on):
        gate.add(args[0].reshape(-1, args[0].shape[-1])[keep].double().cpu(), on)

    _capture(model, items, pad_id, down, positions, add, batch_size)
    u = gate.solve(ridge)
    return {"u": u, **_report(gate.stats(u))}


@torch.no_grad()
def fit_expert_gates(model: nn.Module, items: Sequence[Trajectory], pad_id: int, block: int, positions: str,
                     *, ridge: float = 1e-2, batch_size: int = 8) -> dict:
    """One ``u_e`` per expert of block ``block`` that the trajectories reach: ``u_e . a_e ~= y / S``
    on the tokens routed to ``e`` (``S``: the token's total routing weight)."""
    spec = spec_for(model.config)
    experts = experts_of(spec, model.get_submodule(spec.blocks)[block])
    fits: dict[int, GateFit] = {}

    def add(args, keep, on):  # Experts.forward(hidden [N, H], top_k_index [N, k], top_k_weights [N, k])
        x, index, weight = args[0][keep].float().cpu(), args[1][keep].cpu(), args[2][keep].float().cpu()
        total = weight.sum(-1)
        for e in index.unique().tolist():
            if 0 <= e < expert_count(experts):
                rows = (index == e).any(-1).nonzero().reshape(-1)
                a = expert_inputs(experts, x[rows], e).double()
                fits.setdefault(e, GateFit()).add(a, on[rows], 1.0 / total[rows].double())

    _capture(model, items, pad_id, experts, positions, add, batch_size)
    if not fits:
        raise ValueError("no training token reached the experts")
    us = {e: f.solve(ridge) for e, f in sorted(fits.items())}
    vals = [f.values(us[e]) for e, f in fits.items()]
    st = summarize(torch.cat([v for v, _ in vals]), torch.cat([o for _, o in vals]))
    return {"u_experts": us, **_report(st), "experts_fitted": len(us), "experts": expert_count(experts)}


@torch.no_grad()
def apply_warm_start(model: nn.Module, items: Sequence[Trajectory], pad_id: int, *, vector: torch.Tensor,
                     layer: int, coef: float, positions: str, max_trajectories: int = 256) -> dict:
    """Add the gated rank-one write to block ``layer - 1``'s down-projection of ``model`` in place
    (on a mixture-of-experts block: to every expert's that the trajectories reach).

    Returns the fit statistics (for the manifest), or ``{"skipped": why}`` where the edit is not
    a plain residual write (sandwich-norm blocks rescale the MLP output)."""
    spec = spec_for(model.config)
    if spec.sandwich:
        return {"skipped": "sandwich-norm block: the MLP output is renormalised, no plain rank-one write"}
    block = layer - 1
    mod = model.get_submodule(spec.blocks)[block]
    w = coef * vector.float()
    experts = experts_of(spec, mod)
    if experts is not None:
        if getattr(experts, "has_post_expert_norm", False):
            return {"skipped": f"block {block}'s experts normalise their outputs: a rank-one write is not "
                    "additive there (training starts from the source weights)"}
        fit = fit_expert_gates(model, list(items)[:max_trajectories], pad_id, block, positions)
        W = experts.down_proj
        for e, u in fit.pop("u_experts").items():  # [E, hidden, inter], gpt-oss [E, inter, hidden]
            add_outer(W, u, w, e) if getattr(experts, "is_transposed", False) else add_outer(W, w, u, e)
    else:
        fit = fit_gate(model, list(items)[:max_trajectories], pad_id, block, positions)
        u = fit.pop("u")
        W = mod.get_submodule(down_module(spec, mod)).weight
        if spec.conv1d:  # Conv1D stores [in, out]
            add_outer(W, u, w)
        else:
            add_outer(W, w, u)
    return {"block": block, **{k: round(v, 4) if isinstance(v, float) else v for k, v in fit.items()}}


@torch.no_grad()
def apply_lora_warm_start(peft_model: nn.Module, items: Sequence[Trajectory], pad_id: int, *,
                          vector: torch.Tensor, layer: int, coef: float, positions: str,
                          max_trajectories: int = 256, adapter: str | None = None) -> dict:
    """kl-lora's warm start: the same gated rank-one write as :func:`apply_warm_start`, held by
    one component of the LoRA on block ``layer - 1``'s down-projection instead of the weight.

    ``scale * B A`` gains ``coef * v u^T``: column 0 of ``lora_B`` and row 0 of ``lora_A`` are
    set to ``w/|w| * sqrt(|w| |u| / scale)`` and ``u/|u| * sqrt(|w| |u| / scale)`` (``w = coef *
    v``; the product is the write, the two factors of equal norm so that Adam moves both alike);
    the other columns of ``lora_B`` are zeroed, so the adapter adds nothing else. Call it on a
    freshly wrapped model (the fit runs through the adapter, which adds nothing then).

    Returns the fit statistics, or ``{"skipped": why}`` where there is no single LoRA'd
    down-projection to hold the write (sandwich norms, mixture-of-experts blocks, an adapter that
    leaves the down-projection out)."""
    base = unwrap_peft(peft_model)
    spec = spec_for(base.config)
    if spec.sandwich:
        return {"skipped": "sandwich-norm block: the MLP output is renormalised, no plain rank-one write"}
    block = layer - 1
    mod = base.get_submodule(spec.blocks)[block]
    if experts_of(spec, mod) is not None:
        return {"skipped": f"block {block} is a mixture-of-experts block: no single down-projection for "
                "one LoRA component to hold the write (training starts from a zero adapter)"}
    down = mod.get_submodule(down_module(spec, mod))
    name = adapter or getattr(peft_model, "active_adapter", None) or "default"
    lora_A, lora_B = getattr(down, "lora_A", {}), getattr(down, "lora_B", {})
    if name not in lora_A or name not in lora_B:
        return {"skipped": f"the adapter '{name}' does not train block {block}'s down-projection"}
    A, B = lora_A[name].weight, lora_B[name].weight  # [r, in], [out, r]; delta = scale * B A
    if B.abs().max() > 0:
        raise ValueError("apply_lora_warm_start wants a fresh adapter (lora_B all zero)")
    scale = float(down.scaling[name])
    fit = fit_gate(base, list(items)[:max_trajectories], pad_id, block, positions)
    u = fit.pop("u").float()
    w = coef * vector.float()
    g = (float(w.norm()) * float(u.norm()) / scale) ** 0.5
    B.zero_()
    B[:, 0] = (w / w.norm() * g).to(B)
    A[0, :] = (u / u.norm() * g).to(A)
    return {"block": block, "lora_component": 0, "scale": scale,
            **{k: round(v, 4) if isinstance(v, float) else v for k, v in fit.items()}}
