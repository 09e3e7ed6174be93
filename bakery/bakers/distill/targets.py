"""What the distilled bakers train, per architecture: the linears of the decoder blocks and, on
mixture-of-experts blocks, the experts' fused 3-D weights.

transformers 5.2x keeps the experts of a block (Qwen3-MoE, Qwen3.5-MoE, OLMoE, Mixtral, gpt-oss)
as fused ``nn.Parameter`` tensors (``experts.gate_up_proj``, ``experts.down_proj``), not as
``nn.Linear`` modules. peft 0.21 reaches them with ``target_parameters``: one LoRA per expert
(rank ``r`` each), folded into the fused weight during the forward and merged into it on
``merge_and_unload``. ``experts`` picks which of them train: ``down`` (default: each expert's
down-projection, the matrix that writes the residual stream), ``all`` (also ``gate_up``) or
``none``. Everything else in the blocks (norms, routers, convolutions) is listed by
:func:`untargeted` so that the manifest says exactly what did not train.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

from torch import nn

from bakery.arch import spec_for
from bakery.bakers.distill.errors import DistillError

EXPERT_CHOICES = ("down", "all", "none")


class TargetError(DistillError):
    """A LoRA or fine-tuning target that the architecture does not have."""


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (``model`` itself when there is none)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def linear_module_names(model: nn.Module) -> list[str]:
    """Leaf names of the linear layers inside the decoder blocks (LoRA targets)."""
    from transformers.pytorch_utils import Conv1D

    spec = spec_for(model.config)
    blocks = model.get_submodule(spec.blocks)
    names = {n.rsplit(".", 1)[-1] for n, m in blocks.named_modules() if isinstance(m, (nn.Linear, Conv1D))}
    return sorted(names)


def check_targets(model: nn.Module, targets: Sequence[str] | None) -> list[str]:
    """The LoRA target modules, checked against the architecture (default: all block linears)."""
    have = linear_module_names(model)
    if not targets:
        return have
    missing = [t for t in targets if t not in have]
    if missing:
        raise TargetError(
            f"target module(s) {', '.join(missing)} do not exist in {model.config.model_type} "
            f"blocks; linear layers there are: {', '.join(have)}")
    return list(targets)


def expert_parameters(model: nn.Module, experts: str = "down") -> list[str]:
    """The fused expert weights to train, relative to a block (``mlp.experts.down_proj``), or
    ``[]`` for a dense model. ``experts``: down, all or none."""
    if experts not in EXPERT_CHOICES:
        raise TargetError(f"experts must be one of {', '.join(EXPERT_CHOICES)}; got {experts!r}")
    spec = spec_for(model.config)
    if spec.experts is None or experts == "none":
        return []
    found: set[str] = set()
    for block in model.get_submodule(spec.blocks):
        try:
            mod = block.get_submodule(spec.experts.module)
        except AttributeError:  # a dense block of a MoE model (Qwen3-MoE mlp_only_layers)
            continue
        for name, p in mod.named_parameters(recurse=False):
            if p.ndim == 3 and (experts == "all" or f"{spec.experts.module}.{name}" == spec.experts.fused):
                found.add(f"{spec.experts.module}.{name}")
    return sorted(found)


def module_pattern(model: nn.Module, leaves: Sequence[str]) -> list[str] | str:
    """peft ``target_modules`` for the block linears named ``leaves``: the plain list, or, where a
    module outside the blocks has the same leaf name (a multimodal wrapper's vision tower has
    ``q_proj`` too), a regex that matches inside the blocks only."""
    blocks = spec_for(model.config).blocks
    outside = [n for n, _ in model.named_modules()
               if n.rsplit(".", 1)[-1] in leaves and not n.startswith(blocks + ".")]
    return blocks_regex(blocks, leaves) if outside else list(leaves)


def blocks_regex(blocks: str, leaves: Sequence[str], indices: Sequence[int] | None = None) -> str:
    """A peft ``target_modules`` regex: the linears ``leaves`` in the blocks under ``blocks`` (those
    numbered ``indices``, default all)."""
    number = r"\d+" if indices is None else f"(?:{'|'.join(map(str, indices))})"
    return rf"{re.escape(blocks)}\.{number}\.(?:.*\.)?(?:{'|'.join(map(re.escape, sorted(leaves)))})"


def full_parameters(model: nn.Module, targets: Sequence[str] | None, first_block: int = 0,
                    experts: str = "down") -> list[nn.Parameter]:
    """The weights full fine-tuning moves: every weight and bias of the target linears, and the
    chosen fused expert weights (and their biases), in blocks ``first_block`` and later. Embeddings, norms and the
    head stay frozen: with a few hundred trajectories, updating them learns the training tokens
    rather than the behaviour (and the head is often tied to the embeddings)."""
    names = set(check_targets(model, targets))
    fused = expert_parameters(model, experts)
    blocks = model.get_submodule(spec_for(model.config).blocks)
    out: list[nn.Parameter] = []
    for i, block in enumerate(blocks):
        if i < first_block:
            continue
        out += [p for n, m in block.named_modules() if n.rsplit(".", 1)[-1] in names
                for p in m.parameters(recurse=False)]
        for f in fused:  # with its bias where the experts have one (gpt-oss), as for a linear
            mod_name, _, pname = f.rpartition(".")
            try:
                mod = block.get_submodule(mod_name)
            except AttributeError:  # a dense block
                continue
            out += [p for p in (getattr(mod, pname), getattr(mod, pname + "_bias", None)) if p is not None]
    return out


@dataclass
class Targets:
    """What trains: block linears by leaf name, fused expert weights by block-relative name."""

    modules: list[str]
    parameters: list[str]

    def describe(self, model: nn.Module, *, lora: bool) -> dict:
        """For the manifest: what trained and every other block parameter that did not (LoRA
        leaves the target linears' biases alone; full fine-tuning trains them)."""
        return {"target_modules": self.modules, "target_parameters": self.parameters,
                "not_trained": untargeted(model, self.modules, self.parameters, biases=not lora)}


def lora_targets(model: nn.Module, modules: Sequence[str] | None, experts: str = "down") -> Targets:
    return Targets(check_targets(model, modules), expert_parameters(model, experts))


def untargeted(model: nn.Module, modules: Sequence[str], parameters: Sequence[str], *,
               biases: bool = True) -> list[str]:
    """Block parameters (relative to a block, deduplicated over blocks) that neither a target
    linear (its bias too, where ``biases``) nor a targeted fused weight covers: norms, routers,
    convolutions, untargeted experts."""
    spec = spec_for(model.config)
    leaves = set(modules)
    out: set[str] = set()
    for name, _ in model.get_submodule(spec.blocks).named_parameters():
        name = re.sub(r"^\d+\.", "", name.replace(".base_layer", ""))  # relative to its block, unwrapped
        if "lora_" in name or name in parameters or (biases and name.removesuffix("_bias") in parameters):
            continue
        module = name.rsplit(".", 1)[0] if "." in name else ""
        if module.rsplit(".", 1)[-1] not in leaves or (not biases and name.endswith(".bias")):
            out.add(name)
    return sorted(out)
