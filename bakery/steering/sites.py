"""Runtime steering at sites other than a block's output.

``AttnOutSteering`` adds a constant to the residual stream right after the attention of block
``L`` (before the MLP): the runtime reference for ``bias --site attn-out`` bakes, which put the
constant in the attention output projection's bias. Every position.

It hooks the linear whose bias the bake writes (the table's attn-out route), so that the two
agree on the architectures where that linear is not simply "the attention write": Granite scales
every sublayer write by ``residual_multiplier`` (the hook adds ``delta / residual_multiplier``
there, so the residual stream gets ``delta``), and Qwen3.5 has the linear only in its
full-attention blocks (a Gated DeltaNet block has no attention to steer after: refused).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from bakery.arch import ArchSpec, cfg_get, spec_for, text_config_of
from bakery.errors import BakeryError
from bakery.steering.hooks import blocks_of


class SiteError(BakeryError):
    """A steering site that the block in question does not have."""


def attn_out_target(spec: ArchSpec, config: Any, block: int) -> tuple[str, float]:
    """``(module, scale)`` for the attn-out site of ``block``: the linear whose output is hooked,
    relative to the block, and the factor the constant is divided by before it is added there."""
    route = spec.routes.get("attn-out")
    text = text_config_of(config)
    if route is None:  # no bake can stand for it; the token-mixer write is still the site
        return spec.attn_writer(config, block), 1.0
    if route.layer_type is not None:
        kind = spec.layer_type(config, block)
        if kind != route.layer_type:
            types = cfg_get(text, "layer_types") or []
            ok = [i for i, t in enumerate(types) if t == route.layer_type]
            raise SiteError(
                f"block {block} of this {spec.model_type} model is a {kind} block: it has no "
                f"{route.tensor.rsplit('.', 1)[0]}, so there is no attn-out site to steer there. "
                f"The attn-out site exists only in {route.layer_type} blocks (layers "
                f"{', '.join(map(str, ok)) or 'none'}); pick one of them, or steer at the block "
                "output (--site resid-out)")
    scale = float(cfg_get(text, route.scale_key, 1.0)) if route.scale_key else 1.0
    if scale == 0:
        raise SiteError(f"{route.scale_key} is 0 in this model's config: nothing written after the "
                        "attention reaches the residual stream")
    return route.tensor.rsplit(".", 1)[0], scale


class AttnOutSteering:
    """Context manager: ``delta`` added to the residual stream after the attention of each given
    block (0-based). ``deltas`` is a list of ``(block, delta)``; several deltas at one block add up."""

    def __init__(self, model: nn.Module, deltas: Sequence[tuple[int, torch.Tensor]]):
        self.model, self.deltas, self.spec = model, list(deltas), spec_for(model.config)
        self._handles: list = []
        n = len(blocks_of(model, self.spec))
        for block, _ in self.deltas:  # refuse before any hook is placed
            if not 0 <= block < n:
                raise SiteError(f"block {block} is out of range for a model with {n} blocks (0..{n - 1})")
            attn_out_target(self.spec, model.config, block)

    def __enter__(self) -> "AttnOutSteering":
        blocks = blocks_of(self.model, self.spec)
        summed: dict[int, torch.Tensor] = {}
        for block, delta in self.deltas:
            summed[block] = summed.get(block, 0) + delta.detach().float()
        for block, delta in summed.items():
            name, scale = attn_out_target(self.spec, self.model.config, block)
            mod = blocks[block].get_submodule(name)

            def hook(m, a, out, d=delta / scale):
                h = out[0] if isinstance(out, tuple) else out
                h = h + d.to(dtype=h.dtype, device=h.device)
                return (h, *out[1:]) if isinstance(out, tuple) else h

            self._handles.append(mod.register_forward_hook(hook))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
