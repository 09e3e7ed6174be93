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

from typing import Callable, Sequence

import torch
from torch import nn

from bakery.placement import input_device
from bakery.arch import spec_for
from bakery.bakers.gate_fit import GateFit, StopForward, forward_until_stopped, steered_positions, summarize
from bakery.bakers.neuron_gate import GATES, Edit, GatedWrite, fit_neuron_gate, gated_mlp
from bakery.bakers.distill.sharding import add_outer, local, set_column, set_row
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
    """The fit statistics as the manifest records them (floats to 4 places)."""
    out = {"tokens": st["rows"], "steered_mean": st["on_mean"], "unsteered_mean": st.get("off_mean"),
           "rmse": st["rmse"]}
    out.update({k: st[k] for k in ("gate", "neuron", "neuron_gate") if k in st})
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}


def _frozen(block: nn.Module, names: list[str]) -> str | None:
    """Why kl-full can't edit these modules of ``block``: the teacher keeps the source values of
    the trained weights only, so an edited frozen weight would be missing from it."""
    frozen = [n for n in names if not any(p.requires_grad for p in block.get_submodule(n).parameters())]
    return f"{', '.join(frozen)} do not train (target_modules / first_block)" if frozen else None


@torch.no_grad()
def fit_write(model: nn.Module, items: Sequence[Trajectory], pad_id: int, *, vector: torch.Tensor, layer: int,
              coef: float, positions: str, gate: str = "auto", editable: Callable[[list[str]], str | None] | None = None,
              ridge: float = 1e-2, batch_size: int = 8) -> GatedWrite:
    """The gated write of ``coef * vector`` at block ``layer - 1``'s MLP as rank-one edits.

    ``gate``: ``neuron`` (one repurposed MLP neuron reads the MLP input as well,
    :mod:`bakery.bakers.neuron_gate`), ``linear`` (``u . a`` on the down-projection's input only),
    or ``auto`` (neuron where the MLP and ``editable`` allow it, else linear, saying why).
    ``editable(module names)`` returns why those modules can't be edited, or None."""
    if gate not in GATES:
        raise ValueError(f"gate must be one of {', '.join(GATES)}; got '{gate}'")
    spec = spec_for(model.config)
    block = layer - 1
    mod = model.get_submodule(spec.blocks)[block]
    down_name = down_module(spec, mod)
    down = mod.get_submodule(down_name)
    w = coef * vector.float()
    why_not = "asked for the linear gate" if gate == "linear" else None
    found = None if why_not else gated_mlp(mod, down_name)
    if why_not is None and found is None:
        why_not = "the MLP is not a gated one with separate bias-free gate and up projections"
    if found is not None and editable is not None:
        why_not = editable([f"{found[0]}.{p}" for p in ("gate_proj", "up_proj", "down_proj")])
        found = None if why_not else found
    if found is None and gate == "neuron":
        raise ValueError(f"no neuron gate at block {block}: {why_not}")
    xs, acts, ons = [], [], []
    mlp_hook = found[1].register_forward_pre_hook(lambda m, args: xs.append(args[0])) if found else None

    def add(args, keep, on):
        a = args[0].reshape(-1, args[0].shape[-1])
        acts.append(a[keep].float().cpu())
        ons.append(on.cpu())
        if found:
            xs[-1] = xs[-1].reshape(-1, xs[-1].shape[-1])[keep].float().cpu()

    try:
        _capture(model, items, pad_id, down, positions, add, batch_size)
    finally:
        if mlp_hook is not None:
            mlp_hook.remove()
    on = torch.cat(ons)
    if found:
        write = fit_neuron_gate(found[1], found[0], xs, acts, on, w, ridge=ridge)
        if isinstance(write, GatedWrite):
            return write
        if gate == "neuron":
            raise ValueError(f"no neuron gate at block {block}: {write}")
        why_not = write
    fit = GateFit()
    for a, o in zip(acts, ons):
        fit.add(a.double(), o)
    u = fit.solve(ridge)
    stats = {"gate": "linear", **summarize(*fit.values(u))}
    if gate == "auto":
        stats["neuron_gate"] = f"not used: {why_not}"
    return GatedWrite([Edit(down_name, w, u)], stats)


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
                     layer: int, coef: float, positions: str, max_trajectories: int = 256,
                     gate: str = "auto") -> dict:
    """Add the gated write to block ``layer - 1``'s MLP of ``model`` in place (:func:`fit_write`;
    on a mixture-of-experts block: the linear gate, to every expert's down-projection that the
    trajectories reach).

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
        write = fit_write(model, list(items)[:max_trajectories], pad_id, vector=vector, layer=layer, coef=coef,
                          positions=positions, gate=gate, editable=lambda names: _frozen(mod, names))
        for e in write.edits:
            W = mod.get_submodule(e.module).weight
            add_outer(W, e.in_vec, e.out_vec) if spec.conv1d else add_outer(W, e.out_vec, e.in_vec)
        fit = _report(write.stats)
    return {"block": block, **fit}


@torch.no_grad()
def apply_lora_warm_start(peft_model: nn.Module, items: Sequence[Trajectory], pad_id: int, *,
                          vector: torch.Tensor, layer: int, coef: float, positions: str,
                          max_trajectories: int = 256, adapter: str | None = None, gate: str = "auto") -> dict:
    """kl-lora's warm start: the same gated write as :func:`apply_warm_start`, each of its rank-one
    edits held by one LoRA component of the module it edits instead of the weight.

    For an edit ``b c^T``, column ``k`` of ``lora_B`` and row ``k`` of ``lora_A`` are set to
    ``b/|b| * g`` and ``c/|c| * g`` with ``g = sqrt(|b| |c| / scale)`` (the product is the edit, the
    two factors of equal norm so that Adam moves both alike); the other columns of ``lora_B`` stay
    zero, so the adapter adds nothing else. Call it on a freshly wrapped model (the fit runs
    through the adapter, which adds nothing then).

    Returns the fit statistics, or ``{"skipped": why}`` where no LoRA'd down-projection can hold
    the write (sandwich norms, mixture-of-experts blocks, an adapter that leaves it out)."""
    base = unwrap_peft(peft_model)
    spec = spec_for(base.config)
    if spec.sandwich:
        return {"skipped": "sandwich-norm block: the MLP output is renormalised, no plain rank-one write"}
    block = layer - 1
    mod = base.get_submodule(spec.blocks)[block]
    if experts_of(spec, mod) is not None:
        return {"skipped": f"block {block} is a mixture-of-experts block: no single down-projection for "
                "one LoRA component to hold the write (training starts from a zero adapter)"}
    name = adapter or getattr(peft_model, "active_adapter", None) or "default"

    def lora(module: str):
        m = mod.get_submodule(module)
        if name not in getattr(m, "lora_A", {}) or name not in getattr(m, "lora_B", {}):
            return None
        return m.lora_A[name].weight, m.lora_B[name].weight, float(m.scaling[name])  # delta = scale * B A

    def editable(names: list[str]) -> str | None:
        missing = [n for n in names if lora(n) is None]
        if missing:
            return f"the adapter '{name}' does not train {', '.join(missing)}"
        if lora(names[-1])[0].shape[0] < 2:
            return "the down-projection's LoRA needs rank 2 (the write and the repurposed neuron's column)"
        return None

    down_name = down_module(spec, mod)
    if lora(down_name) is None:
        return {"skipped": f"the adapter '{name}' does not train block {block}'s down-projection"}
    if any(local(lora(n)[1]).abs().sum() > 0 for n in _lora_modules(mod, name)):
        raise ValueError("apply_lora_warm_start wants a fresh adapter (lora_B all zero)")
    write = fit_write(base, list(items)[:max_trajectories], pad_id, vector=vector, layer=layer, coef=coef,
                      positions=positions, gate=gate, editable=editable)
    used: dict[str, int] = {}
    for e in write.edits:
        A, B, scale = lora(e.module)
        k = used[e.module] = used.get(e.module, -1) + 1
        g = (float(e.out_vec.norm()) * float(e.in_vec.norm()) / scale) ** 0.5
        set_column(B, k, e.out_vec / e.out_vec.norm().clamp_min(1e-12) * g)  # sharded: this process's rows
        set_row(A, k, e.in_vec / e.in_vec.norm().clamp_min(1e-12) * g)
    return {"block": block, "lora_components": {k: v + 1 for k, v in used.items()},
            **_report(write.stats)}


def warm_start_applies(model: nn.Module, block: int) -> bool:
    """Whether kl-lora's warm start can hold a write at block ``block`` (a dense MLP block that
    is not sandwich-normed)."""
    spec = spec_for(model.config)
    blocks = model.get_submodule(spec.blocks)
    return not spec.sandwich and 0 <= block < len(blocks) and experts_of(spec, blocks[block]) is None


def default_lora_first_block(model: nn.Module, cfg, layer: int) -> None:
    """kl-lora from the warm start puts its LoRA on the blocks from the steered one on
    (``cfg.first_block``, unless given): the blocks before it compute the same thing in teacher
    and student, and LoRA there only adds noise. Call it before the adapter is built."""
    if cfg.method == "lora" and cfg.first_block is None and cfg.uses_warm_start() and \
            warm_start_applies(model, layer - 1):
        cfg.first_block = layer - 1


def _lora_modules(block: nn.Module, name: str) -> list[str]:
    return [n for n, m in block.named_modules() if name in getattr(m, "lora_B", {})]
