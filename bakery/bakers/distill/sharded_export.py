"""The export of a sharded student, written from its shards one tensor at a time.

Every process takes part in gathering each tensor (a collective); the main process merges the
LoRA into it where there is one, casts it to the export dtype and streams it into a safetensors
file (:class:`~bakery.io.checkpoint.ShardedWriter`, the closed-form bakers' writer), then lets
it go. No process ever
holds more than one whole tensor of the model. The files are staged in a folder that the export
(:class:`~bakery.bakers.distill.export.StagedWeights`) then moves into place.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import torch
from torch import nn

from bakery.bakers.distill.errors import DistillError
from bakery.bakers.distill.sharded_load import checkpoint_name
from bakery.bakers.distill.targets import unwrap_peft
from bakery.io.checkpoint import DEFAULT_SHARD_BYTES, DTYPES, OutTensor, ShardedWriter

ADAPTER = "default"


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return (t.full_tensor() if isinstance(t, DTensor) else t).detach()


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Base-weight parameter name -> its peft LoRA layer; fused-expert adapters are refused."""
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora.layer import ParamWrapper

    out = {}
    for name, m in model.named_modules():
        if isinstance(m, ParamWrapper):
            raise DistillError("a sharded kl-lora bake of fused expert weights (peft target_parameters) is not "
                               "supported: pass --set experts=none, or run data parallel")
        if isinstance(m, LoraLayer) and ADAPTER in m.lora_A:
            out[f"{name}.base_layer.weight"] = m
    return out


def _merged(m: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    a, b = _full(m.lora_A[ADAPTER].weight), _full(m.lora_B[ADAPTER].weight)
    delta = (b.float() @ a.float()) * m.scaling[ADAPTER]
    return weight + (delta.T if getattr(m, "fan_in_fan_out", False) else delta).to(weight)


def stage_sharded(model: nn.Module, *, method: str, dtype: torch.dtype, staging: Path, is_main: bool,
                  max_shard_bytes: int | None = None, progress: bool = False) -> None:
    """Write ``model``'s export weights (LoRA merged), ``config.json`` and, for LoRA, ``adapter/``
    into ``staging`` on the main process. Every process must call it: each tensor is gathered by
    all of them, in the same order, as the main process's writer asks for it."""
    from tqdm.auto import tqdm

    lora = lora_layers(model) if method == "lora" else {}
    params = [(n, p) for n, p in model.named_parameters() if ".lora_" not in n]
    bar = tqdm(total=len(params), desc="writing the sharded export", unit="tensor",
               disable=not (progress and is_main))

    def produce(n: str, p: torch.Tensor):
        def gather() -> torch.Tensor:
            t = _full(p)
            if n in lora:
                t = _merged(lora[n], t)
            bar.update(1)
            return t.to(dtype)
        return gather

    if is_main:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        name = {v: k for k, v in DTYPES.items()}[dtype]
        ShardedWriter(staging, max_shard_bytes or DEFAULT_SHARD_BYTES).write(
            [OutTensor(checkpoint_name(n), name, tuple(p.shape), produce=produce(n, p)) for n, p in params])
    else:  # the same gathers, in the writer's order
        for n, p in params:
            produce(n, p)()
    bar.close()
    adapter = {n.replace(f".{ADAPTER}.", "."): _full(p).clone() for n, p in model.named_parameters()
               if ".lora_" in n}
    if not is_main:
        return
    base = unwrap_peft(model)
    config = copy.deepcopy(base.config)
    config.dtype = dtype
    config.save_pretrained(staging)
    if method == "lora":
        from safetensors.torch import save_file

        (staging / "adapter").mkdir()
        save_file(adapter, str(staging / "adapter" / "adapter_model.safetensors"), metadata={"format": "pt"})
        model.peft_config[ADAPTER].save_pretrained(str(staging / "adapter"))
