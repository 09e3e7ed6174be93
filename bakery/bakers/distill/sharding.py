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
    # The root is the transformers model, not peft's wrapper (generation calls it directly), and
    # resharding is said explicitly, or FSDP keeps the root's weights (embeddings, head) whole
    # between forward and backward: the teacher's forward has no backward to free them.
    fully_shard(base, reshard_after_forward=True)


def checkpoint_blocks(model: nn.Module) -> None:
    """Activation checkpointing per decoder block (PyTorch's composable ``checkpoint``: hooks, no
    wrapper module, so parameter names and the steering hooks stay as they are). Applied before
    sharding, as FSDP2 wants; a block already checkpointed is left alone."""
    from torch.distributed._composable import checkpoint
    from torch.distributed._composable.contract import _get_registry

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for block in base.get_submodule(spec_for(base.config).blocks):
        if "checkpoint" not in (_get_registry(block) or {}):
            checkpoint(block)


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def local(t: torch.Tensor) -> torch.Tensor:
    """The tensor this process holds: a DTensor's local shard (a view of its storage), or ``t``."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t.data


@torch.no_grad()
def add_outer(W: torch.Tensor, a: torch.Tensor, b: torch.Tensor, index: int | None = None) -> None:
    """``W += a b^T`` (``W[index] += a b^T`` with ``index``), in place; on a first-dimension
    shard, only the rows this process holds are touched."""
    from torch.distributed.tensor import DTensor

    if not isinstance(W, DTensor):
        (W if index is None else W[index]).addr_(a.to(W), b.to(W))
        return
    from bakery.bakers.distill.sharded_load import shard_rows

    start, end = shard_rows(W.shape[0], W)
    mine = W.to_local()
    if index is None:
        mine.addr_(a[start:end].to(mine), b.to(mine))
    elif start <= index < end:
        mine[index - start].addr_(a.to(mine), b.to(mine))


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
