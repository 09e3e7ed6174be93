"""Persistence traces: generate with the KV cache, steering on for the first tokens only, and
record the projection of the hidden state at the layer for every generated token."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch

from bakery.fidelity.persist.settings import BAKED, STEERED, SWITCH, UNSTEERED, PersistSettings, Trace
from bakery.placement import input_device
from bakery.steering.generation import encode_prompts, eos_token_ids, render_chat
from bakery.steering.hooks import Steering, SteeringTerm, blocks_of
from bakery.vectors.artifact import VectorArtifact, VectorError, unit


def check_vector_for_persist(vec: VectorArtifact, config: Any, layer: int) -> torch.Tensor:
    """The row ``v[L]`` after checking shape and layer; the post-norm last row is refused."""
    vec.check_model(config)
    vec.check_layer(layer)
    if layer == vec.num_layers:
        raise VectorError(
            f"layer {layer} is the last row, taken after the final norm: the output of block "
            f"{layer - 1} is not that hidden state, so its projection is not defined. Choose a "
            f"layer in 1..{layer - 1}."
        )
    row = vec.row(layer)
    if float(row.norm()) == 0.0:
        raise VectorError(f"row {layer} of the vector is all zeros: nothing to project onto or steer with")
    return row


class _LastPositionProjection:
    """Forward hook on block ``L-1`` recording ``(h . v)/|v|`` at the last position of each call.

    Registered after the steering hook, so it sees the output as the next block reads it.
    """

    def __init__(self, block: torch.nn.Module, direction: torch.Tensor):
        self.unit = unit(direction, "the steering direction")
        self.value: torch.Tensor | None = None
        self.handle = block.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        self.value = h[:, -1].float() @ self.unit.to(h.device)

    def remove(self) -> None:
        self.handle.remove()


def logits_kwargs(model) -> dict[str, int]:
    """``logits_to_keep=1`` where the model takes it: only the last position's logits are used."""
    import inspect

    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


def cache_keyword(model) -> str:
    """The forward's keyword for the KV cache: ``cache`` since transformers 5.24 (which warns on
    the old ``past_key_values``), ``past_key_values`` before."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _sample(logits: torch.Tensor, temperature: float, gen: torch.Generator) -> torch.Tensor:
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    return torch.multinomial(probs.cpu(), 1, generator=gen).squeeze(-1).to(logits.device)


@dataclass
class BatchTrace:
    """Raw result of :func:`trace_batch` for one left-padded batch."""

    sequences: torch.Tensor  # [B, P + T] ids (prompt left-padded)
    attention_mask: torch.Tensor  # [B, P]: the prompt's padding mask
    prompt_len: int  # P (padded)
    projection: torch.Tensor  # [B, T] float32, NaN after end of sequence
    alive: torch.Tensor  # [B, T] bool: token t is part of the answer


@torch.no_grad()
def trace_batch(model, tok, texts: Sequence[str], *, layer: int, direction: torch.Tensor,
                coef: float, steer_tokens: int, total_tokens: int, temperature: float = 0.0,
                seed: int = 0, suppress_eos: bool = True, progress=None) -> BatchTrace:
    """Generate ``total_tokens`` for rendered prompts, steering the first ``steer_tokens`` of them.

    Uses the KV cache: one forward call per new token. ``steer_tokens=0`` never steers (also the
    right setting for a baked checkpoint); ``steer_tokens >= total_tokens`` steers throughout.
    """
    from transformers import DynamicCache

    device = input_device(model)
    enc = encode_prompts(tok, texts).to(device)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    B, P = ids.shape
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.config)
    gen = torch.Generator().manual_seed(int(seed))
    eos = torch.tensor(eos_token_ids(model, tok) or [-1], device=device)
    pad = tok.pad_token_id if tok.pad_token_id is not None else int(eos[0])
    block = blocks_of(model)[layer - 1]
    extra = logits_kwargs(model)
    cache_kw = cache_keyword(model)

    proj = torch.full((B, total_tokens), float("nan"))
    alive_at = torch.zeros((B, total_tokens), dtype=torch.bool)
    alive = torch.ones(B, dtype=torch.bool, device=device)
    full_mask = mask.long()
    step_ids, step_pos = ids, positions
    out_ids = [ids]
    for t in range(total_tokens):
        steering = (Steering(model, [SteeringTerm(layer, direction, coef)])
                    if t < steer_tokens else contextlib.nullcontext())
        with steering:
            cap = _LastPositionProjection(block, direction)  # after the steering hook
            try:
                out = model(input_ids=step_ids, attention_mask=full_mask, position_ids=step_pos,
                            use_cache=True, **{cache_kw: cache}, **extra)
            finally:
                cap.remove()
        logits = out.logits[:, -1].float().to(device)  # the head may sit on another device
        if suppress_eos:
            logits[:, eos[eos >= 0]] = float("-inf")
        nxt = _sample(logits, temperature, gen)
        nxt = torch.where(alive, nxt, torch.full_like(nxt, pad))
        alive_at[:, t] = alive.cpu()
        proj[:, t] = torch.where(alive.cpu(), cap.value.cpu(), torch.tensor(float("nan")))
        if not suppress_eos:
            alive = alive & ~torch.isin(nxt, eos)
        out_ids.append(nxt.unsqueeze(1))
        step_ids = nxt.unsqueeze(1)
        step_pos = step_pos[:, -1:] + 1
        full_mask = torch.cat([full_mask, torch.ones((B, 1), dtype=full_mask.dtype, device=device)], 1)
        if progress is not None:
            progress.update(1)
    return BatchTrace(torch.cat(out_ids, 1).cpu(), mask.cpu(), P, proj, alive_at)


def _batches(items: Sequence, size: int) -> Iterable[tuple[int, Sequence]]:
    for i in range(0, len(items), size):
        yield i, items[i:i + size]


def run_condition(model, tok, prompts: Sequence[str], settings: PersistSettings, *,
                  condition: str, direction: torch.Tensor, vector_norm: float,
                  progress=None) -> list[Trace]:
    """Traces of one condition for every prompt and seed."""
    N, T = settings.steer_tokens, settings.total_tokens
    steer_tokens = {UNSTEERED: 0, SWITCH: N, STEERED: T, BAKED: 0}[condition]
    texts = [render_chat(tok, p, settings.system) for p in prompts]
    injected_value = settings.coef * vector_norm
    traces: list[Trace] = []
    for seed in settings.seeds:
        for start, chunk in _batches(texts, settings.batch_size):
            bt = trace_batch(model, tok, chunk, layer=settings.layer, direction=direction,
                             coef=settings.coef, steer_tokens=steer_tokens, total_tokens=T,
                             temperature=settings.temperature, seed=seed,
                             suppress_eos=settings.suppress_eos, progress=progress)
            for j in range(len(chunk)):
                gen_ids = bt.sequences[j, bt.prompt_len:].tolist()
                alive = bt.alive[j].tolist()
                kept = [i for i, a in zip(gen_ids, alive) if a]
                traces.append(Trace(
                    condition=condition, prompt_index=start + j, prompt=prompts[start + j],
                    seed=int(seed), steered_tokens=steer_tokens,
                    token_ids=kept, tokens=[tok.decode([i]) for i in kept],
                    projection=[None if not a else float(p) for p, a in zip(bt.projection[j].tolist(), alive)][:len(kept)],
                    injected=[injected_value if t < steer_tokens else 0.0 for t in range(len(kept))],
                    text_steered_phase=tok.decode(kept[:N], skip_special_tokens=True),
                    text_free_phase=tok.decode(kept[N:], skip_special_tokens=True),
                ))
    return traces
