"""Sharded loading for distillation under FSDP2: no process ever holds the whole model.

The student is built on the ``meta`` device (no memory), wrapped with LoRA if asked, sharded with
:func:`~bakery.bakers.distill.sharding.shard_blocks` (each parameter becomes a ``DTensor`` split
along its first dimension), given real but empty storage for this process's rows only, and filled
from the checkpoint's safetensors files: each process reads just the rows it holds
(:meth:`~bakery.io.checkpoint.CheckpointReader.get_rows`). Non-persistent buffers (rotary frequencies) are computed on the
CPU as at any load. LoRA's ``A`` matrices are drawn per name (:func:`~bakery.bakers.distill.
lora.init_lora`), so a sharded run starts from the same adapter as an unsharded one.
"""

from __future__ import annotations

from pathlib import Path

import torch

from bakery.bakers.distill.errors import DistillError


def checkpoint_name(param_name: str) -> str:
    """The checkpoint key of a (peft-wrapped) model parameter."""
    n = param_name.removeprefix("base_model.model.")
    return n.replace(".base_layer.", ".")


def build_sharded_student(model_dir: Path, cfg, *, device: torch.device, layer: int | None = None,
                          trust_remote_code: bool = False):
    """The student of a sharded run (``cfg``: a :class:`~bakery.bakers.distill.train.TrainConfig`),
    float32, LoRA-wrapped for ``cfg.method == "lora"``, sharded over the process group, filled from
    ``model_dir``; and the description of what trains (read before peft wraps the linears). Needs
    ``torch.distributed`` initialised (accelerate's launch does it). ``layer``: the steered layer,
    for kl-lora's default ``first_block``."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from bakery.bakers.distill.lora import lora_init_value
    from bakery.bakers.distill.sharding import checkpoint_blocks, local, local_rows, shard_blocks, shard_rows
    from bakery.bakers.distill.targets import lora_targets, unwrap_peft
    from bakery.bakers.distill.lora import add_lora
    from bakery.bakers.distill.warm_start import default_lora_first_block
    from bakery.io.checkpoint import CheckpointReader

    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    with init_empty_weights(include_buffers=False):  # parameters on meta, buffers computed
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=trust_remote_code)
    model.tie_weights()  # from_config leaves a tied head untied (from_pretrained ties it)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    targets = lora_targets(model, cfg.target_modules, cfg.experts).describe(model, lora=cfg.method == "lora")
    if cfg.method == "lora":
        if layer is not None:
            default_lora_first_block(model, cfg, layer)
        model = add_lora(model, cfg, init=False)  # adapters on meta too; drawn below per name
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}  # real: computed at construction
    if cfg.checkpoints_activations(sharded=True):  # before sharding, as FSDP2 wants
        checkpoint_blocks(model)
    shard_blocks(model)
    model.to_empty(device=device)
    # the root's weights are not sharded (shard_blocks), and to_empty gives a tied head its own
    # storage: tie it again before filling
    unwrap_peft(model).tie_weights()
    ckpt = CheckpointReader(model_dir)
    params = dict(model.named_parameters())
    missing = [n for n in params if ".lora_" not in n and checkpoint_name(n) not in ckpt]
    if missing:
        raise DistillError(
            f"sharded loading reads each parameter's rows by name, and {len(missing)} are not stored under "
            f"their names in {model_dir} (e.g. {checkpoint_name(missing[0])}): this layout needs transformers' "
            "conversion at load time. Run data parallel (accelerate launch --multi_gpu) instead of --use_fsdp")
    with torch.no_grad():
        for n, p in params.items():
            dest = local(p)
            if ".lora_" in n:
                dest.copy_(local_rows(lora_init_value(n, tuple(p.shape), cfg.seed), p))
                continue
            key = checkpoint_name(n)
            start, end = shard_rows(ckpt.tensors[key].shape[0], p)
            dest.copy_(ckpt.get_rows(key, start, end).to(torch.float32))
        for n, b in model.named_buffers():
            b.copy_(buffers[n].to(b.device))
    return model, targets


def refuse_unshardable(config: dict, *, model_prompts: int = 0) -> None:
    """What sharded loading does not cover, refused before any work."""
    from bakery.bakers.distill.export import is_wrapper

    if is_wrapper(config):
        raise DistillError("sharded distillation of a multimodal wrapper is not supported (its export keeps "
                           "the source checkpoint's vision tower, written from a whole copy): run it in one "
                           "process or data parallel (accelerate launch --multi_gpu)")
    if model_prompts:
        raise DistillError("model_prompts (questions the model writes itself) is not supported under FSDP: "
                           "write them in a one-process run, or pass --set prompts_file=FILE")
