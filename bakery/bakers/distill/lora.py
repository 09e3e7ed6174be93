"""kl-lora's adapter: where it goes (:func:`add_lora`) and what it starts from. The starting
matrices are drawn per parameter name: ``A`` as peft draws it (Kaiming-uniform,
``a = sqrt(5)``), ``B`` zero. Each name has its own generator seeded from the run's seed, so the
adapter a run starts from does not depend on how the model was built (whole, or sharded on the
``meta`` device) or on the order its modules were created in."""

from __future__ import annotations

import math
import zlib

import torch
from torch import nn

from bakery.arch import spec_for
from bakery.bakers.distill.errors import DistillError
from bakery.bakers.distill.targets import blocks_regex, lora_targets, module_pattern
from bakery.bakers.distill.train_config import TrainConfig


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


def add_lora(model: nn.Module, cfg: TrainConfig, *, init: bool = True):
    """Wrap ``model`` with a fresh peft LoRA adapter (the adapter lives inside the model object):
    on the block linears and, on mixture-of-experts blocks, the chosen fused expert weights.
    Its starting matrices are drawn per name from ``cfg.seed`` (``init=False``: left to the caller,
    for a model on the meta device)."""
    from peft import LoraConfig, get_peft_model

    t = lora_targets(model, cfg.target_modules, cfg.experts)
    modules, parameters = module_pattern(model, t.modules), t.parameters
    if cfg.first_block:  # only the blocks from first_block on
        blocks = spec_for(model.config).blocks
        n = len(model.get_submodule(blocks))
        if not 0 <= cfg.first_block < n:
            raise DistillError(f"first_block must be between 0 and {n - 1} (the model has {n} blocks); "
                               f"got {cfg.first_block}")
        modules = blocks_regex(blocks, t.modules, range(cfg.first_block, n))
        parameters = [f"{blocks}.{i}.{p}" for i in range(cfg.first_block, n) for p in parameters]
    lcfg = LoraConfig(r=cfg.rank, lora_alpha=cfg.resolved_alpha(), target_modules=modules,
                      target_parameters=parameters or None, lora_dropout=0.0, bias="none",
                      use_rslora=cfg.rslora, task_type="CAUSAL_LM", fan_in_fan_out=spec_for(model.config).conv1d)
    peft_model = get_peft_model(model, lcfg)
    if init:
        init_lora(peft_model, cfg.seed)
    return peft_model
