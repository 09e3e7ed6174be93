"""Runtime steering and ablation hooks: the reference every bake is measured against.

Steering adds ``coef * v[L]`` to the output of block ``L-1`` (row ``L`` of the artifact).
Ablation projects a unit direction out of every write into the residual stream: the embedding
output, each token-mixer write (attention, or Qwen3.5's Gated DeltaNet) and each MLP write (the
whole mixture-of-experts block where there is one; for sandwich-norm blocks, the post-norm outputs).

Positions are absolute indices in the (left-padded) sequence. The hooks learn where a forward call
starts from the KV cache length, so they are right under ``generate``: with ``positions="prompt"``
and no explicit ``prompt_len`` the first forward call of a sequence (the prefill) is the prompt.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from torch import nn

from bakery.arch import ArchSpec, spec_for
from bakery.vectors.artifact import VectorArtifact

POSITIONS = ("all", "prompt", "response")


@dataclass(frozen=True)
class SteeringTerm:
    """One additive edit: ``coef * vector`` at row ``layer`` (output of block ``layer - 1``)."""

    layer: int
    vector: torch.Tensor
    coef: float = 1.0


def blocks_of(model: nn.Module, spec: ArchSpec | None = None) -> nn.ModuleList:
    spec = spec or spec_for(model.config)
    return model.get_submodule(spec.blocks)


def _past_length(args: tuple, kwargs: dict) -> int:
    pos = kwargs.get("cache_position")
    if isinstance(pos, torch.Tensor) and pos.numel():
        return int(pos.reshape(-1)[0])
    # transformers 5.24 renamed the generate-time keyword from past_key_values to cache
    cache = kwargs.get("past_key_values", kwargs.get("cache"))
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    try:  # legacy tuple cache
        return int(cache[0][0].shape[-2])
    except (TypeError, IndexError):
        return 0


def _seq_len(args: tuple, kwargs: dict) -> int:
    for key in ("input_ids", "inputs_embeds"):
        x = kwargs.get(key)
        if x is not None:
            return int(x.shape[1])
    if args and isinstance(args[0], torch.Tensor):
        return int(args[0].shape[1])
    raise ValueError("steering hook cannot find input_ids or inputs_embeds in the forward call")


class _OnDevice:
    """A float32 tensor with copies made once per (device, dtype) it is used on: a hook on a model
    spread over devices adds it where the hooked block ran, without a host copy every call."""

    def __init__(self, t: torch.Tensor):
        self.t = t.detach().float()
        self._copies: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def like(self, h: torch.Tensor) -> torch.Tensor:
        key = (h.device, h.dtype)
        if key not in self._copies:
            self._copies[key] = self.t.to(device=h.device, dtype=h.dtype)
        return self._copies[key]


def _hidden(output):
    return output[0] if isinstance(output, tuple) else output


def _replace_hidden(output, hidden: torch.Tensor):
    if isinstance(output, tuple):
        return (hidden, *output[1:])
    return hidden


class _PositionTracker:
    """Pre-hook on the whole model: where the current forward call sits in the sequence."""

    def __init__(self, model: nn.Module, prompt_len: int | torch.Tensor | None):
        self.fixed_prompt_len = prompt_len
        self.prompt_len: int | torch.Tensor | None = prompt_len
        self.offset = 0
        self.length = 0
        self.handle = model.register_forward_pre_hook(self._pre, with_kwargs=True)

    def _pre(self, module, args, kwargs):
        self.offset = _past_length(args, kwargs)
        self.length = _seq_len(args, kwargs)
        if self.fixed_prompt_len is None and self.offset == 0:
            self.prompt_len = self.length

    def mask(self, positions: str, device: torch.device) -> torch.Tensor | None:
        """``None`` for every position, else a bool mask of shape [S] or [B, S]."""
        if positions == "all":
            return None
        absolute = torch.arange(self.offset, self.offset + self.length, device=device)
        plen = self.prompt_len
        if isinstance(plen, torch.Tensor):
            plen = plen.to(device).view(-1, 1)
        in_prompt = absolute < plen
        return in_prompt if positions == "prompt" else ~in_prompt

    def remove(self) -> None:
        self.handle.remove()


class Steering:
    """Context manager adding steering terms at block outputs.

    ``prompt_len`` (int, or a [batch] tensor for right-padded rows) marks where the response
    starts for teacher-forced passes; during ``generate`` it may be left out.
    """

    def __init__(self, model: nn.Module, terms: Sequence[SteeringTerm], positions: str = "all",
                 prompt_len: int | torch.Tensor | None = None):
        if positions not in POSITIONS:
            raise ValueError(f"positions must be one of {', '.join(POSITIONS)}; got '{positions}'")
        self.model = model
        self.terms = list(terms)
        self.positions = positions
        self.prompt_len = prompt_len
        self._handles: list = []
        self._tracker: _PositionTracker | None = None
        n = len(blocks_of(model))
        for t in self.terms:
            if not 1 <= t.layer <= n:
                raise ValueError(f"layer {t.layer} is out of range for a model with {n} blocks (1..{n})")

    def _hook(self, delta: torch.Tensor):
        cast = _OnDevice(delta)

        def hook(module, args, output):
            h = _hidden(output)
            d = cast.like(h)
            mask = self._tracker.mask(self.positions, h.device) if self._tracker else None
            if mask is None:
                h = h + d
            else:
                if mask.ndim == 1:
                    mask = mask.view(1, -1, 1)
                else:
                    mask = mask.unsqueeze(-1)
                h = h + d * mask.to(h.dtype)
            return _replace_hidden(output, h)

        return hook

    def __enter__(self) -> "Steering":
        blocks = blocks_of(self.model)
        self._tracker = _PositionTracker(self.model, self.prompt_len)
        by_layer: dict[int, torch.Tensor] = {}
        for t in self.terms:
            by_layer[t.layer] = by_layer.get(t.layer, 0) + t.coef * t.vector.detach().float()
        for layer, delta in by_layer.items():
            # prepend: transformers records output_hidden_states with its own forward hooks, installed
            # before ours; they must see the steered output
            self._handles.append(blocks[layer - 1].register_forward_hook(self._hook(delta), prepend=True))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self._tracker:
            self._tracker.remove()
            self._tracker = None


def steer(model: nn.Module, vector: VectorArtifact | torch.Tensor, layer: int | Iterable[int],
          coef: float, positions: str = "all", prompt_len: int | torch.Tensor | None = None) -> Steering:
    """Steer with ``coef * v[L]`` at each given layer (rows of an artifact or a [L+1, H] tensor)."""
    table = vector.vectors if isinstance(vector, VectorArtifact) else vector
    layers = [layer] if isinstance(layer, int) else list(layer)
    terms = [SteeringTerm(L, table[L], coef) for L in layers]
    return Steering(model, terms, positions=positions, prompt_len=prompt_len)


class Ablation:
    """Context manager: ``x <- x - (x . r) r`` on every residual write.

    ``direction`` is one vector or a dict ``{block index: vector}`` (the embedding uses block 0's).
    ``blocks`` limits the ablated blocks (default all); ``embeddings=False`` leaves the embedding
    output alone (the honest reference for an ortho bake that keeps tied embeddings untouched).
    """

    def __init__(self, model: nn.Module, direction: torch.Tensor | dict[int, torch.Tensor],
                 blocks: Iterable[int] | None = None, embeddings: bool = True):
        self.model = model
        self.spec = spec_for(model.config)
        n = len(blocks_of(model, self.spec))
        self.blocks = list(range(n)) if blocks is None else list(blocks)
        self.embeddings = embeddings
        if isinstance(direction, dict):
            self.dirs = {i: _unit(direction[i]) for i in self.blocks}
            self.embed_dir = _unit(direction.get(0, next(iter(direction.values()))))
        else:
            r = _unit(direction)
            self.dirs = {i: r for i in self.blocks}
            self.embed_dir = r
        self._handles: list = []

    @staticmethod
    def _hook(r: torch.Tensor):
        cast = _OnDevice(r)

        def hook(module, args, output):
            h = _hidden(output)
            rr = cast.like(h)
            return _replace_hidden(output, h - (h @ rr).unsqueeze(-1) * rr)

        return hook

    def __enter__(self) -> "Ablation":
        m = self.model
        if self.embeddings:
            for name in self.spec.embeddings:
                self._handles.append(
                    m.get_submodule(name).register_forward_hook(self._hook(self.embed_dir), prepend=True))
        blocks = blocks_of(m, self.spec)
        for i in self.blocks:
            # the token mixer's write (per layer type: Qwen3.5's Gated DeltaNet or attention) and the
            # MLP's; for a mixture of experts the MoE block's output is the sum of every routed
            # expert's and the shared expert's write, so one hook there ablates each of them
            for name in (self.spec.attn_writer(m.config, i), self.spec.mlp_writer()):
                mod = blocks[i].get_submodule(name)
                self._handles.append(mod.register_forward_hook(self._hook(self.dirs[i]), prepend=True))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def _unit(v: torch.Tensor) -> torch.Tensor:
    v = v.detach().float()
    norm = v.norm()
    if norm == 0:
        raise ValueError("cannot ablate a zero vector: the direction has no length")
    return v / norm
