"""Runtime steering at sites other than a block's output.

``AttnOutSteering`` adds a constant to the attention write of block ``L`` (after attention,
before the MLP): the runtime reference for ``bias --site attn-out`` bakes, which put the constant
in the attention output projection's bias. Every position.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from bakery.arch import spec_for
from bakery.steering.hooks import blocks_of


class AttnOutSteering:
    """Context manager: ``delta`` added to the attention output of each given block (0-based).

    ``deltas`` is a list of ``(block, delta)``; several deltas at one block add up."""

    def __init__(self, model: nn.Module, deltas: Sequence[tuple[int, torch.Tensor]]):
        self.model, self.deltas, self.spec = model, list(deltas), spec_for(model.config)
        self._handles: list = []

    def __enter__(self) -> "AttnOutSteering":
        blocks = blocks_of(self.model, self.spec)
        summed: dict[int, torch.Tensor] = {}
        for block, delta in self.deltas:
            summed[block] = summed.get(block, 0) + delta.detach().float()
        for block, delta in summed.items():
            mod = blocks[block].get_submodule(self.spec.attn_writer(self.model.config, block))

            def hook(m, a, out, d=delta):
                h = out[0] if isinstance(out, tuple) else out
                h = h + d.to(dtype=h.dtype, device=h.device)
                return (h, *out[1:]) if isinstance(out, tuple) else h

            self._handles.append(mod.register_forward_hook(hook))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
