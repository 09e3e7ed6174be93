"""The output head, applied by the distillation loss itself, a few rows at a time.

A causal LM's forward ends in ``[batch, positions, vocab]`` logits, and a log-softmax and the KL
each make another tensor that size: with a 150k-260k vocabulary (Qwen, Gemma 3) they outweigh
the model's activations. The loss instead takes the final hidden states (the head's input: the
forward hands the head an empty slice and returns them in place of the logits) and applies the
head to chunks of rows (:func:`bakery.bakers.distill.losses.chunked_kl`)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

import torch
from torch import nn

from bakery.arch import cfg_get, text_config_of
from bakery.bakers.distill.targets import unwrap_peft

# rows per chunk: about 4M logits (16 MB in float32) at a time
CHUNK_LOGITS = 1 << 22


def output_head(model: nn.Module) -> nn.Module:
    """The model's output embedding (the ``lm_head``), through peft and multimodal wrappers."""
    base = unwrap_peft(model)
    head = base.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(base).__name__} has no output embedding (get_output_embeddings() is None)")
    return head


def head_function(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The map from final hidden states to the logits the model's own forward makes: the head,
    then the scaling some architectures apply after it (Gemma 2's soft-capping, Granite's
    ``logits_scaling``, Cohere's ``logit_scale``). A test pins it to the forward for every
    architecture bakery supports. The head is whole in every process, sharded runs included
    (:func:`~bakery.bakers.distill.sharding.shard_blocks` leaves it out)."""
    cfg = text_config_of(model.config)
    head = output_head(model)
    scaling, scale = cfg_get(cfg, "logits_scaling"), cfg_get(cfg, "logit_scale")
    cap = cfg_get(cfg, "final_logit_softcapping")

    def logits(hidden: torch.Tensor) -> torch.Tensor:
        out = head(hidden)
        if scaling:
            out = out / scaling
        if scale:
            out = out * scale
        if cap:
            out = torch.tanh(out / cap) * cap
        return out

    return logits


def rows_per_chunk(model: nn.Module) -> int:
    vocab = output_head(model).weight.shape[0]
    return max(1, CHUNK_LOGITS // vocab)


@contextmanager
def hidden_as_logits(model: nn.Module):
    """Within: the model's forward skips its head (a pre-hook hands it an empty slice) and returns
    the head's input, the final hidden states ``[batch, kept positions, hidden]``, as its
    ``logits``. They are an output of the outermost module, not a tensor caught inside it:
    FSDP2 starts a sharded root's backward from its outputs' gradients."""
    base = unwrap_peft(model)
    caught: list[torch.Tensor] = []

    def skip_head(_module, args, kwargs):
        h = args[0] if args else kwargs["input"]
        caught.append(h)
        return (h[..., :0, :],), {}

    def return_hidden(_module, _args, output):
        output.logits = caught.pop().clone()  # not a view: FSDP2 warns of in-place edits to views
        return output

    handles = [output_head(model).register_forward_pre_hook(skip_head, with_kwargs=True),
               base.register_forward_hook(return_hidden, prepend=True)]  # before FSDP2's post-forward
    try:
        yield
    finally:
        for h in handles:
            h.remove()
