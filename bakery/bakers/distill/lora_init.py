"""LoRA's starting matrices drawn per parameter name: ``A`` as peft draws it (Kaiming-uniform,
``a = sqrt(5)``), ``B`` zero. Each name has its own generator seeded from the run's seed, so the
adapter a run starts from does not depend on how the model was built (whole, or sharded on the
``meta`` device) or on the order its modules were created in."""

from __future__ import annotations

import math
import zlib

import torch
from torch import nn


def lora_init_value(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """The starting value of LoRA parameter ``name`` (float32, CPU)."""
    t = torch.empty(shape, dtype=torch.float32)
    if ".lora_B." in name:
        return t.zero_()
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    return nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=g)


@torch.no_grad()
def init_lora(model: nn.Module, seed: int) -> None:
    """Draw every LoRA ``A`` (and zero every ``B``) of ``model`` in place."""
    for n, p in model.named_parameters():
        if ".lora_A." in n or ".lora_B." in n:
            p.copy_(lora_init_value(n, tuple(p.shape), seed).to(p))
