"""FSDP for the distilled bakers: shard a model's blocks across processes, and gather them back.

``accelerate launch --use_fsdp`` shards the model on GPUs, but on CPU accelerate silently runs
plain data parallel (every process holds the whole model). When FSDP is asked for and accelerate
did not apply it, bakery applies PyTorch's FSDP2 (``fully_shard``, one unit per decoder block
plus the root) itself; it runs over gloo on CPU. Either way the parameters become sharded
``DTensor``s, and checkpoints and exports need the full tensors: the helpers here gather them
(collectives: every process must call them) and put them back.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from bakery.arch import spec_for


def fsdp_requested() -> bool:
    """``accelerate launch --use_fsdp`` (or ``ACCELERATE_USE_FSDP=true``)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def shard_blocks(model: nn.Module) -> None:
    """FSDP2 in place: each decoder block is one unit, the rest (embeddings, head) the root's."""
    from torch.distributed.fsdp import fully_shard

    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft wraps it
    for block in base.get_submodule(spec_for(base.config).blocks):
        fully_shard(block)
    fully_shard(model)


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def full_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Full CPU copies of (possibly sharded) tensors; a collective, in the dict's order."""
    from torch.distributed.tensor import DTensor

    return {n: (t.full_tensor() if isinstance(t, DTensor) else t).detach().cpu().clone() for n, t in tensors.items()}


def like_params(model: nn.Module, full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Full tensors laid out as ``model``'s parameters of the same name (sharded where they are)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    params = dict(model.named_parameters())
    out = {}
    for n, t in full.items():
        p = params[n]
        out[n] = (distribute_tensor(t.to(p.dtype), p.device_mesh, p.placements) if isinstance(p, DTensor)
                  else t)
    return out


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict with full tensors, on the main process (others get ``{}``)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, optim_state_dict=state,
                             options=StateDictOptions(full_state_dict=True))
