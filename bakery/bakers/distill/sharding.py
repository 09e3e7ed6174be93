"""FSDP2 for the distilled bakers: shard a model's blocks across processes, checkpoint their
activations, and edit or swap sharded weights in place.

Under ``accelerate launch --use_fsdp`` bakery applies PyTorch's FSDP2 itself (``fully_shard``,
one unit per decoder block plus the transformers model as root), on GPUs over NCCL and on the
CPU over gloo, where accelerate would silently run plain data parallel. The student comes
sharded from :mod:`~bakery.bakers.distill.sharded_load`; checkpoints and exports are written
from the shards (:mod:`~bakery.bakers.distill.checkpoints`, :mod:`~bakery.bakers.distill.
sharded_export`).
"""

from __future__ import annotations

import math
import os

import torch
from torch import nn

from bakery.arch import spec_for
from bakery.bakers.distill.errors import DistillError
from bakery.bakers.distill.targets import unwrap_peft


def fsdp_requested() -> bool:
    """``accelerate launch --use_fsdp`` (or ``ACCELERATE_USE_FSDP=true``)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def shard_blocks(model: nn.Module) -> None:
    """FSDP2 in place: each decoder block is one unit; the rest (embeddings, norm, head) is the
    root's and, where frozen (always, in distillation), is not sharded."""
    from torch.distributed.fsdp import fully_shard

    base = unwrap_peft(model)
    blocks = spec_for(base.config).blocks
    for block in base.get_submodule(blocks):
        fully_shard(block)
    # The root is the transformers model, not peft's wrapper (generation calls it directly). Its
    # frozen weights (embeddings, final norm, head) stay whole in every process: every forward
    # needs them whole from the embedding to the head, and gathering a shard of them holds the
    # gathered copy and FSDP's all-gather buffer at once, more than the whole weights at rest.
    frozen = {p for n, p in base.named_parameters() if not n.startswith(blocks + ".") and not p.requires_grad}
    fully_shard(base, reshard_after_forward=True, ignored_params=frozen)


def checkpoint_blocks(model: nn.Module) -> None:
    """Activation checkpointing per decoder block (PyTorch's composable ``checkpoint``: hooks, no
    wrapper module, so parameter names and the steering hooks stay as they are). Applied before
    sharding, as FSDP2 wants; a block already checkpointed is left alone."""
    from torch.distributed._composable import checkpoint
    from torch.distributed._composable.contract import _get_registry

    base = unwrap_peft(model)
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
def set_row(W: torch.Tensor, i: int, value: torch.Tensor) -> None:
    """``W[i] = value``; on a first-dimension shard, only by the process that holds row ``i``."""
    start, end = shard_rows(W.shape[0], W)
    if start <= i < end:
        local(W)[i - start] = value.to(local(W))


@torch.no_grad()
def set_column(W: torch.Tensor, j: int, value: torch.Tensor) -> None:
    """``W[:, j] = value``; on a first-dimension shard, each process writes its rows."""
    start, end = shard_rows(W.shape[0], W)
    local(W)[:, j] = value[start:end].to(local(W))


@torch.no_grad()
def add_outer(W: torch.Tensor, a: torch.Tensor, b: torch.Tensor, index: int | None = None) -> None:
    """``W += a b^T`` (``W[index] += a b^T`` with ``index``), in place; on a first-dimension
    shard, only the rows this process holds are touched."""
    from torch.distributed.tensor import DTensor

    if not isinstance(W, DTensor):
        (W if index is None else W[index]).addr_(a.to(W), b.to(W))
        return
    start, end = shard_rows(W.shape[0], W)
    mine = W.to_local()
    if index is None:
        mine.addr_(a[start:end].to(mine), b.to(mine))
    elif start <= index < end:
        mine[index - start].addr_(a.to(mine), b.to(mine))


def shard_rows(n: int, p) -> tuple[int, int]:
    """The rows ``[start, end)`` of a first-dimension FSDP2 shard of ``n`` rows held here (its
    ``torch.chunk`` layout)."""
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(p, DTensor):
        return 0, n
    (placement,) = p.placements
    if not (isinstance(placement, Shard) and placement.dim == 0):
        raise DistillError(f"unexpected FSDP placement {placement}: bakery shards along the first dimension")
    mesh = p.device_mesh
    world, rank = mesh.size(), mesh.get_local_rank()
    c = math.ceil(n / world)
    start = min(rank * c, n)
    return start, min(start + c, n)


def local_rows(full: torch.Tensor, p) -> torch.Tensor:
    """The rows of ``full`` that this process holds of parameter ``p``."""
    start, end = shard_rows(full.shape[0], p)
    return full[start:end]
